"""MNIST-optuna.py end to end: the quick preset, the seed lock, and a search blind to the test set."""
import json
import shutil

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from conftest import (
    QUICK_MAIN,
    TINY,
    TINY_CNN,
    TINY_NET,
    assert_one_line_error,
    load_script,
    model_test_accuracy,
    run_in_process,
)
from mnist_optuna import studies, training
from mnist_optuna.training import TrainConfig

COLUMNS = ["seed", "number", "state"]


def trials(out_dir):
    """trials.csv's seed, number, state, objective value(s) and parameters."""
    frame = pd.read_csv(out_dir / "trials.csv")
    values = sorted(c for c in frame.columns if c.startswith("value"))
    params = sorted(c for c in frame.columns if c.startswith("params_"))
    return frame[COLUMNS + values + params]


@QUICK_MAIN
def test_quick_run_end_to_end(quick_main_run):
    out, stdout = quick_main_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["complete"] + summary["counts"]["pruned"] == 4
    frame = trials(out)
    assert len(frame) == 4 and set(frame["seed"]) == {0, 1}
    # the search's best is the most accurate complete trial of trials.csv; the promotion then chose model.pt's network
    complete = frame[frame["state"] == "COMPLETE"]
    assert summary["search_best"]["value"] == complete["value_val_accuracy"].max()
    best = json.loads((out / "best_params.json").read_text())
    chosen = complete[(complete["seed"] == best["study_seed"]) & (complete["number"] == best["trial"])]
    assert chosen["value_val_accuracy"].tolist() == [best["value"]]
    # the printed and recorded test accuracy is what model.pt, the chosen trial's network, scores on the test set
    accuracy, meta = model_test_accuracy(out)
    assert accuracy == summary["test_accuracy"] == meta["test_accuracy"]
    assert f"test accuracy: {100 * accuracy:.2f} %" in stdout
    assert (meta["study_seed"], meta["trial"]) == (best["study_seed"], best["trial"])


@pytest.mark.parametrize("search", [[], ["--objectives", "accuracy", "mmac"]], ids=["accuracy", "front"])
def test_the_seed_alone_decides_the_trials_and_the_test_set_is_never_read(capsys, data_dir, tmp_path, search):
    # two runs of one seed, the second with the test labels shuffled and the test images noise: every trial (TPE's proposals after its
    # two random ones included), value and validation choice must be the same, and only the test accuracy moves
    shuffled = tmp_path / "shuffled"
    (shuffled / "MNIST" / "raw").mkdir(parents=True)
    for path in (data_dir / "MNIST" / "raw").iterdir():
        shutil.copy(path, shuffled / "MNIST" / "raw" / path.name)
    labels_path = shuffled / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    content = bytearray(labels_path.read_bytes())
    labels = np.frombuffer(bytes(content[8:]), dtype=np.uint8).copy()
    np.random.default_rng(0).shuffle(labels)
    content[8:] = labels.tobytes()
    labels_path.chmod(0o644)
    labels_path.write_bytes(bytes(content))
    # and the test images noise: the search's inputs must not be normalised with their statistics
    images_path = shuffled / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    pixels = bytearray(images_path.read_bytes())
    pixels[16:] = np.random.default_rng(1).integers(0, 256, len(pixels) - 16, dtype=np.uint8).tobytes()
    images_path.chmod(0o644)
    images_path.write_bytes(bytes(pixels))

    args = [*TINY, *TINY_CNN, "--n-trials", "3", "--n-startup-trials", "2", "--promote", "2", *search]
    real = run_in_process(capsys, "MNIST-optuna.py", *args, "--seeds", "5", "--out-dir", tmp_path / "real")
    fake = run_in_process(capsys, "MNIST-optuna.py", *args, "--seeds", "5", "--out-dir", tmp_path / "fake",
                          "--data-dir", shuffled)
    assert real.returncode == 0 and fake.returncode == 0, real.stderr + fake.stderr
    pd.testing.assert_frame_equal(trials(tmp_path / "real"), trials(tmp_path / "fake"))
    summary_real = json.loads((tmp_path / "real" / "summary.json").read_text())
    summary_fake = json.loads((tmp_path / "fake" / "summary.json").read_text())
    # the promotion's scores and choice are validation only: the same with shuffled test labels
    def promoted(summary):
        return [{k: row[k] for k in ("trial", "search_val", "promoted_val")} for row in summary["promotion"]["rows"]]
    assert promoted(summary_real) == promoted(summary_fake)
    assert summary_real.get("front") == summary_fake.get("front") and summary_real["best"] == summary_fake["best"]
    assert summary_fake["test_accuracy"] < 0.3 < summary_real["test_accuracy"]  # read once, after the choice
    if not search:  # and another seed gives other trials
        other = run_in_process(capsys, "MNIST-optuna.py", *args, "--seeds", "6", "--no-final", "--out-dir",
                               tmp_path / "other")
        assert other.returncode == 0, other.stderr
        params = [c for c in trials(tmp_path / "real").columns if c.startswith("params_")]
        assert not trials(tmp_path / "real")[params].equals(trials(tmp_path / "other")[params])


@pytest.mark.parametrize("flags, says", [
    (["--n-trials", "0"], "--n-trials"),
    (["--epochs", "-1"], "--epochs"),
    (["--device", "nonsense"], "--device"),
    (["--storage", "nosuch://x"], "nosuch"),
    (["--train-subset", "60000"], "--train-subset"),
    (["--seeds"], "--seeds"),
    (["--pruner", "bogus"], "--pruner"),
    (["--conv-filters", "32", "16", "8"], "--conv-filters"),
])
def test_bad_flags_get_one_line_and_exit_2(capsys, tmp_path, flags, says):
    # in-process; test_an_unrelated_folder_is_never_overwritten runs such a refusal as its own process
    result = run_in_process(capsys, "MNIST-optuna.py", "--quick", *flags, "--out-dir", tmp_path / "out")
    assert says in assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_an_unrelated_folder_is_never_overwritten(run_here, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    result = run_here("MNIST-optuna.py", "--quick", "--out-dir", tmp_path)
    assert "--out-dir" in assert_one_line_error(result)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_help_lists_the_constants_as_defaults():
    script = load_script("MNIST-optuna.py")
    text = script.build_parser().format_help()
    assert f"(default: {script.N_TRIALS})" in text and "--final-epochs" in text


@QUICK_MAIN
def test_quick_run_shows_each_score_with_its_noise_and_tests_the_best_against_the_runner_up(quick_main_run):
    import re

    import optuna

    from mnist_optuna.scores import mcnemar, unpack_correct
    from mnist_optuna.storages import make_storage

    out, output = quick_main_run
    lines = [line for line in output.splitlines() if re.search(r"trial +\d+  COMPLETE", line)]
    assert lines and all(re.search(r"val \d+\.\d\d ± \d\.\d\d %, NLL \d\.\d{4}", line) for line in lines)
    verdict = re.search(r"best trial (\d+) is (better beyond noise than|within noise of) the runner-up \(trial (\d+),"
                        r".*: (\d+) right only by the best, (\d+) only by the other, p = ([0-9.e-]+)\)", output)
    assert verdict, output
    # the counts and the p-value are those of the two trials' recorded per-image correctness on validation
    storage = make_storage(None, out, must_exist=True)
    trials = {(t.number, t.user_attrs["study"]): t for name in ("mnist-cnn-seed0", "mnist-cnn-seed1")
              for t in optuna.load_study(study_name=name, storage=storage).trials}
    summary = json.loads((out / "summary.json").read_text())
    best, other = summary["search_best"], summary["search_best"]["against_runner_up"]
    first = trials[(best["trial"], f"mnist-cnn-seed{best['seed']}")].user_attrs["validation"]
    second = trials[(other["runner_up"]["trial"], f"mnist-cnn-seed{other['runner_up']['seed']}")].user_attrs[
        "validation"]
    images = load_script("MNIST-optuna.py").QUICK["VAL_SIZE"]  # every validation image of the --quick run
    assert first["images"] == second["images"] == images
    only_best, only_other, p_value = mcnemar(unpack_correct(first["correct"], images),
                                             unpack_correct(second["correct"], images))
    assert (only_best, only_other) == (other["only_best"], other["only_other"]) == tuple(map(int, verdict.group(4, 5)))
    assert p_value == other["p_value"] and f"{p_value:.2g}" == verdict.group(6)
    assert (verdict.group(2) == "within noise of") == (not other["beyond_noise"])
    # the NLL is that of the trial: a real cross-entropy, not a placeholder
    assert 0 < first["nll"] < 1 and first["nll"] != second["nll"]
    # the studies name what they optimise, for Optuna's dashboard and CLI
    assert optuna.load_study(study_name="mnist-cnn-seed0", storage=storage).metric_names == ["val_accuracy"]
    assert "promotion" in summary and summary["promotion"]["rule"] and "chosen by the rule:" in output


def test_an_out_of_memory_trial_fails_with_its_reason_and_the_study_goes_on(small):
    calls = {"n": 0}

    def objective(trial):
        trial.suggest_int("width", 8, 8)
        model_config = dict(TINY_NET)
        calls["n"] += 1
        if calls["n"] == 1:  # the first trial's first forward pass runs out of memory
            original = training.train

            def explode(*_):
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

            def train_oom(model, *args, **kwargs):
                model.register_forward_pre_hook(explode)
                return original(model, *args, **kwargs)
            studies.train = train_oom
            try:
                return studies.run_trial(trial, model_config, TrainConfig(epochs=1, batch_size=100), small, 0)
            finally:
                studies.train = original
        return studies.run_trial(trial, model_config, TrainConfig(epochs=1, batch_size=100), small, calls["n"])

    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=2, catch=studies.CATCH)
    first, second = study.trials
    assert first.state.name == "FAIL" and first.user_attrs["reason"].startswith("out of memory")
    assert second.state.name == "COMPLETE" and second.value > 0.1
