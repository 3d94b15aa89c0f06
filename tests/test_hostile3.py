"""Input that would silently mean something else, found by a hostile pass: refused in one line before any work."""
import pytest

from conftest import SEARCH, TINY, TINY_CNN, assert_one_line_error, run_in_process, stop_after, study_trials


@pytest.mark.parametrize("flags, words", [
    (["--conv-filters", "8", "16", "32"], "--conv-filters: step 32 is larger than the range 8..16"),
    (["--fc-width", "64", "128", "100"], "--fc-width: step 100 is larger than the range 64..128"),
])
def test_a_step_past_its_range_is_refused(capsys, tmp_path, flags, words):
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, *flags, "--out-dir", tmp_path / "o")
    assert words in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_one_value_as_a_range_is_still_allowed(capsys, tmp_path):
    # LOW = HIGH is one value on purpose: it passes the check (and stops later only at the bad flag after it)
    result = run_in_process(capsys, "MNIST-optuna.py", *TINY, *TINY_CNN, "--conv-filters", "8", "8", "8",
                            "--kernel-sizes", "4", "--out-dir", tmp_path / "o")
    assert "--kernel-sizes must be odd" in assert_one_line_error(result)


@pytest.mark.parametrize("script", ["MNIST-optuna.py", "MNIST-optuna-adv.py"])
@pytest.mark.parametrize("sizes", [["--val-size", "1"], ["--train-subset", "1"], ["--val-size", "99"]])
def test_a_split_too_small_to_score_anything_is_refused(capsys, tmp_path, script, sizes):
    result = run_in_process(capsys, script, *TINY, *sizes, "--out-dir", tmp_path / "o")
    assert "needs at least 100 images" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()


def test_a_stopped_final_stage_leaves_nothing_that_the_next_stage_publishes(tmp_path):
    import json

    import torch

    from conftest import run_script

    out = tmp_path / "run"
    first = [*SEARCH, "--promote", "0", "--out-dir", out]
    assert run_script("MNIST-optuna.py", *first).returncode == 0
    # another final stage (3 seeds, 2 epochs) stopped once its repeat 1 is made: seed-1.pt waits in the staging folder
    code, output = stop_after(out, "final recipe, repeat 1", *first, "--retrain-only", "--final-seeds", "3",
                              "--final-epochs", "2")
    assert code == 130, output
    again = run_script("MNIST-optuna.py", *first, "--retrain-only")
    assert again.returncode == 0, again.stderr
    names = {path.name for path in out.iterdir()}
    assert "seed-1.pt" not in names and not (out / ".final-stage").exists()
    # every file is of this stage: summary.json names model.pt's accuracy and no seed repeats
    model = torch.load(out / "model.pt", weights_only=True)
    summary = json.loads((out / "summary.json").read_text())
    assert model["meta"]["test_accuracy"] == summary["test_accuracy"] and "final_seeds" not in summary
    assert model["train"]["epochs"] != 2


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


def tampered(payload, path):
    import torch

    torch.save(payload, path)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda p: p["state_dict"]["head.0.weight"] if "head.0.weight" in p["state_dict"] else next(
        iter(p["state_dict"].values())), "it holds a Tensor"),
    (lambda p: {**p, "meta": []}, "its meta is a list"),
    (lambda p: {**p, "meta": {**p["meta"], "std": 0.0}}, "its normalisation std 0.0 is not positive"),
    (lambda p: {**p, "meta": {**p["meta"], "mean": "x"}}, "its normalisation mean 'x' is not a number"),
    (lambda p: {**p, "config": {**p["config"], "num_classes": 0}}, "num_classes 0 is not a number of classes"),
    (lambda p: {**p, "meta": {**p["meta"], "command": 7}}, "its recorded command is not text"),
], ids=["bare-tensor", "meta-list", "std-0", "mean-text", "no-classes", "command-int"])
def test_a_tampered_checkpoint_is_one_line_for_evaluate_and_verify(capsys, tmp_path, change, words):
    import subprocess
    import sys

    import torch

    from conftest import ROOT
    from mnist_optuna.checkpoints import save_checkpoint
    from mnist_optuna.training import TrainConfig
    from models import build_model

    good = tmp_path / "good.pt"
    model = build_model({"conv": [{"channels": 4, "kernel": 3, "pool": True, "slope": 0.01, "batch_norm": True}],
                         "fc": [16], "dropout": 0.0})
    save_checkpoint(good, model, TrainConfig(), {"mean": 0.13, "std": 0.31, "command": "python MNIST-optuna.py"})
    bad = tampered(change(torch.load(good, weights_only=True)), tmp_path / "bad.pt")
    result = run_in_process(capsys, "MNIST-optuna.py", "--evaluate", bad)
    assert words in assert_one_line_error(result)
    # the good one and the bad one as an ensemble: the same line, no traceback
    result = run_in_process(capsys, "MNIST-optuna.py", "--evaluate", good, bad)
    assert words in assert_one_line_error(result)
    verify = subprocess.run([sys.executable, str(ROOT / "results" / "verify.py"), str(bad)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode != 0 and "Traceback" not in verify.stderr and words in verify.stderr + verify.stdout


def test_the_same_command_twice_at_once_in_one_folder_runs_once(tmp_path):
    import subprocess
    import sys

    from conftest import DATA_DIR, ROOT, run_script

    out = tmp_path / "twice"
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2",
               "--no-plots", "--out-dir", str(out), "--data-dir", str(DATA_DIR)]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the second starts once the first holds the folder (its config.json is written right after the lock)
    import time
    deadline = time.monotonic() + 120
    while not (out / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output, errors = first.communicate(timeout=300)
    assert first.returncode == 0, errors
    assert second.returncode == 2 and "another run is using --out-dir" in second.stderr, second.stderr
    assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1
    rows = (out / "trials.csv").read_text().strip().splitlines()[1:]
    assert len(rows) == 2  # --n-trials 2, trained once
    # and once the first has ended, the same command in the folder resumes as always
    assert run_script("MNIST-optuna.py", *TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--no-plots",
                      "--out-dir", out).returncode == 0


def test_a_publish_killed_half_way_is_finished_by_the_next_run_before_it_reads_the_folder(capsys, tmp_path):
    import json

    from mnist_optuna.rundir import PUBLISHING, STAGING

    out = tmp_path / "run"
    args = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--no-plots", "--promote", "0", "--out-dir", out]
    assert run_in_process(capsys, "MNIST-optuna.py", *args, "--final-seeds", "2").returncode == 0
    # a later stage (one seed) killed while its files moved: model.pt is already the new one, the rest is not
    staging = out / STAGING
    staging.mkdir()
    for name, text in (("model.pt", b"new model"), ("summary.json", b'{"stage": "new"}'),
                       ("best_params.json", b'{"stage": "new"}')):
        (staging / name).write_bytes(text)
    (staging / PUBLISHING).write_text(json.dumps({"names": ["best_params.json", "model.pt", "summary.json"],
                                                  "previous": ["seed-1.pt"]}))
    (staging / "model.pt").replace(out / "model.pt")  # the one move done before the kill
    assert (out / "seed-1.pt").exists() and json.loads((out / "summary.json").read_text()).get("stage") != "new"
    # the next run in the folder finishes the moves first, before it reads anything
    again = run_in_process(capsys, "MNIST-optuna.py", *args, "--retrain-only", "--no-final")
    assert again.returncode == 0, again.stderr
    assert "the move is finished" in again.stdout + again.stderr
    assert (out / "model.pt").read_bytes() == b"new model" and not (out / "seed-1.pt").exists()
    assert not staging.exists()


def test_finish_publish_completes_every_move_once(tmp_path):
    import json

    from mnist_optuna.rundir import PUBLISHING, STAGING, finish_publish

    staging = tmp_path / STAGING
    staging.mkdir()
    (tmp_path / "summary.json").write_text("old")
    (tmp_path / "ensemble-1.pt").write_text("old member")
    (staging / "summary.json").write_text("new")
    (staging / ".lock").write_text("")
    (staging / PUBLISHING).write_text(json.dumps({"names": ["summary.json", "model.pt"],
                                                  "previous": ["ensemble-1.pt"]}))
    (tmp_path / "model.pt").write_text("new model")  # moved before the kill
    assert finish_publish(tmp_path)
    assert (tmp_path / "summary.json").read_text() == "new" and (tmp_path / "model.pt").read_text() == "new model"
    assert not (tmp_path / "ensemble-1.pt").exists() and not staging.exists()
    assert not finish_publish(tmp_path)  # nothing left to finish


def test_bytes_appended_after_a_journals_last_record_are_dropped_with_a_backup_not_the_study():
    import os

    from mnist_optuna.storages import readable_records

    records = b'{"op_code": 0, "worker_id": "a"}\n{"op_code": 5, "worker_id": "a"}\n'
    garbage = os.urandom(300).replace(b"{", b"(")
    kept, dropped, foreign = readable_records(records + garbage)
    assert kept == records and dropped == len(garbage) and not foreign
    # the same bytes before a whole record are no crash's leftovers: the file is not mended
    assert readable_records(garbage + b"\n" + records)[2]


def test_a_journal_with_bytes_appended_resumes_its_study(capsys, tmp_path):
    import os


    out = tmp_path / "run"
    assert run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--no-final", "--out-dir", out).returncode == 0
    journal = out / "study.journal"
    original = journal.read_bytes()
    journal.write_bytes(original + os.urandom(200).replace(b"{", b"("))
    result = run_in_process(capsys, "MNIST-optuna.py", *SEARCH, "--no-final", "--n-trials", "3", "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert "no whole record" in result.stdout + result.stderr
    assert len([t for t in study_trials(journal) if t.state.name in ("COMPLETE", "PRUNED")]) >= 3  # went on
    assert any(path.read_bytes().startswith(original) for path in out.glob("study.journal.torn-*"))


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


def test_conv_blocks_given_as_one_json_list_say_how_to_pass_them(capsys, tmp_path):
    result = run_in_process(capsys, "MNIST-optuna-adv.py", *TINY, "--conv-blocks",
                            '[{"channels": 8, "kernel": 3, "pool": true}]', "--out-dir", tmp_path / "o")
    line = assert_one_line_error(result)
    assert "conv block 0 is a list" in line and "one argument per block" in line


def test_a_backbone_of_another_number_of_classes_is_refused(capsys, tmp_path):
    from mnist_optuna.checkpoints import save_checkpoint
    from mnist_optuna.training import TrainConfig
    from models import build_model

    twelve = tmp_path / "twelve.pt"
    save_checkpoint(twelve, build_model({"conv": [{"channels": 4, "kernel": 3, "pool": True}], "fc": [8],
                                         "num_classes": 12}), TrainConfig(), {})
    for script, flags in (("MNIST-optuna.py", ["--stage", "optim"]), ("MNIST-optuna-adv.py", [])):
        result = run_in_process(capsys, script, *TINY, *flags, "--backbone", twelve, "--out-dir", tmp_path / "o")
        assert "classifies 12 classes, MNIST has 10" in assert_one_line_error(result)
    assert not (tmp_path / "o").exists()
