import shutil

import numpy as np
import pytest
import torch

import data
from conftest import TINY, TINY_CNN, assert_one_line_error, run_in_process


@pytest.fixture(scope="module")
def train_labels(data_dir):
    return data.read_split(data_dir, "train")[1].numpy()


def test_split_is_stratified_disjoint_and_stable(train_labels):
    val, train = data.stratified_take(train_labels, 10_000, seed=3)
    assert len(val) == 10_000 and len(train) == 50_000
    assert len(np.intersect1d(val, train)) == 0
    assert len(np.union1d(val, train)) == 60_000
    # every class keeps its share of the 60,000 to within one image
    overall = np.bincount(train_labels, minlength=10) / len(train_labels)
    assert np.all(np.abs(np.bincount(train_labels[val], minlength=10) - overall * 10_000) <= 1)
    again, _ = data.stratified_take(train_labels, 10_000, seed=3)
    other, _ = data.stratified_take(train_labels, 10_000, seed=4)
    assert np.array_equal(val, again)
    assert not np.array_equal(val, other)


def test_search_data_subset_is_stratified_and_apart_from_validation(data_dir):
    split = data.load_search_data(data_dir, torch.device("cpu"), val_size=2000, train_subset=3000, split_seed=0)
    assert split.train_x.shape == (3000, 1, 28, 28) and split.val_x.shape == (2000, 1, 28, 28)
    assert len(np.intersect1d(split.train_indices, split.val_indices)) == 0
    counts = torch.bincount(split.train_y, minlength=10).numpy()
    assert counts.min() >= 250 and counts.max() <= 350
    # normalised with the training file's statistics: about zero mean, unit spread
    assert abs(split.train_x.mean().item()) < 0.05 and abs(split.train_x.std().item() - 1) < 0.05


def test_batches_cover_a_permutation_once(data_dir):
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    seen = [yb for _, yb in data.batches(x, y, 3, torch.Generator().manual_seed(0))]
    assert [len(b) for b in seen] == [3, 3, 3]  # the partial last batch is dropped when training
    flat = torch.cat(seen)
    assert len(set(flat.tolist())) == 9
    again = torch.cat([yb for _, yb in data.batches(x, y, 3, torch.Generator().manual_seed(0))])
    assert torch.equal(flat, again)
    assert torch.equal(torch.cat([yb for _, yb in data.batches(x, y, 4, drop_last=False)]), y)


def copy_data(data_dir, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data_dir / "MNIST", target / "MNIST")
    for path in (target / "MNIST" / "raw").iterdir():
        path.chmod(0o644)
    return target


def test_truncated_file_is_one_line_exit_2(data_dir, tmp_path, capsys):
    target = copy_data(data_dir, tmp_path)
    images = target / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1_000_000])
    with pytest.raises(data.DataError, match="truncated or corrupt"):
        data.ensure_files(target)
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--out-dir", tmp_path / "out", "--data-dir", target)
    assert "train-images-idx3-ubyte" in assert_one_line_error(result)


def test_wrong_magic_number_is_rejected(data_dir, tmp_path):
    target = copy_data(data_dir, tmp_path)
    labels = target / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    content[3] = 0x07
    labels.write_bytes(bytes(content))
    with pytest.raises(data.DataError, match="magic number"):
        data.ensure_files(target)


def test_other_mnist_format_data_only_warns(data_dir, tmp_path, capsys):
    target = copy_data(data_dir, tmp_path)
    images = target / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    content = bytearray(images.read_bytes())
    content[-1] ^= 0xFF
    images.write_bytes(bytes(content))
    data.ensure_files(target)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "not the canonical MNIST file" in warning[0]


def test_missing_data_folder_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    # a named folder is never downloaded into: no network is touched and no folder is created
    monkeypatch.setattr(data, "_download", lambda folder: pytest.fail("a named --data-dir was downloaded into"))
    missing = tmp_path / "nowhere"
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
        data.ensure_files(missing)
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", "--out-dir", tmp_path / "out", "--data-dir", missing)
    line = assert_one_line_error(result)
    assert str(missing) in line and "train-images-idx3-ubyte" in line and "t10k-labels-idx1-ubyte" in line
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_data_dir_falls_back_to_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_DATA_DIR", str(tmp_path))
    assert data.resolve_data_dir(None) == tmp_path
    assert data.resolve_data_dir("x") == data.Path("x")
    monkeypatch.delenv("MNIST_DATA_DIR")
    assert data.resolve_data_dir(None) == data.Path("data")


def copied_data(data_dir, folder):
    import shutil

    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        shutil.copy(path, raw / path.name)
        (raw / path.name).chmod(0o644)
    return raw


def test_a_test_label_out_of_range_is_refused_before_the_search(capsys, tmp_path, data_dir):
    raw = copied_data(data_dir, tmp_path / "data")
    labels = raw / "t10k-labels-idx1-ubyte"
    content = bytearray(labels.read_bytes())
    content[8 + 1234] = 12
    labels.write_bytes(bytes(content))
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--data-dir", tmp_path / "data",
                            "--out-dir", tmp_path / "o")
    assert "t10k-labels-idx1-ubyte holds labels outside 0..9" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()  # refused before any folder, trial or training


def test_training_images_of_one_value_are_refused_in_one_line(capsys, tmp_path, data_dir):
    raw = copied_data(data_dir, tmp_path / "data")
    images = raw / "train-images-idx3-ubyte"
    content = bytearray(images.read_bytes())
    content[16:] = bytes(len(content) - 16)
    images.write_bytes(bytes(content))
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--data-dir", tmp_path / "data",
                            "--out-dir", tmp_path / "o")
    # a non-canonical file is warned about first; then the one error line
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the training images are all one value (0)")
    assert not (tmp_path / "o").exists()


def test_compressed_mnist_files_are_named_with_the_command_that_unpacks_them(capsys, tmp_path, data_dir):
    import gzip

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        (raw / f"{path.name}.gz").write_bytes(gzip.compress(path.read_bytes()[:1000], compresslevel=1))
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, "--data-dir", tmp_path / "data",
                            "--out-dir", tmp_path / "o")
    line = assert_one_line_error(result)
    assert "is still compressed" in line and "gunzip -k" in line and "train-images-idx3-ubyte.gz" in line
