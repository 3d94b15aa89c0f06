"""results/verify.py: a shipped checkpoint retrained through the command it records, compared bit for bit."""
import re
import shutil
import subprocess

import pytest
import torch

from conftest import LONG, TINY, TINY_CNN, assert_one_line_error, load_script, run_in_process, run_script

SEARCH = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--promote", "2", "--final-seeds", "2"]


def verify(capsys, path):
    """`python results/verify.py path` in this process (its replay is a process of its own, as always): its exit
    code and what it printed."""
    try:
        code = load_script("results/verify.py").main(str(path))
    except SystemExit as exited:
        code = exited.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["results/verify.py", str(path)], code, out, err)


@LONG
def test_verify_reproduces_a_seed_repeat_and_catches_one_changed_weight(capsys, tmp_path, data_dir):
    out, journal = tmp_path / "run", tmp_path / "study.journal"
    first = run_script("MNIST-optuna.py", *SEARCH, "--storage", journal, "--out-dir", out)
    assert first.returncode == 0, first.stderr
    study_before = journal.read_bytes()

    # repeat 1: the replay reuses the run's model.pt (repeat 0) and trains repeat 1
    again = verify(capsys, out / "seed-1.pt")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reproduced bit for bit" in again.stdout and f"reusing {out}/model.pt (an earlier repeat)" in again.stdout
    assert "--final-seeds 2" in again.stdout and "this run: 1 thread)" in again.stdout
    assert journal.read_bytes() == study_before  # the replay used a copy of the journal

    payload = torch.load(out / "model.pt", map_location="cpu", weights_only=False)
    name = next(iter(payload["state_dict"]))
    payload["state_dict"][name] = payload["state_dict"][name].clone()
    payload["state_dict"][name].view(-1)[0] += 1e-3
    torch.save(payload, tmp_path / "changed.pt")
    changed = verify(capsys, tmp_path / "changed.pt")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert f"NOT reproduced: 1 of {len(payload['state_dict'])} tensors differ ({name})" in changed.stdout
    shutil.rmtree(re.search(r"the replay is in (\S+)", changed.stdout).group(1))  # kept for a look when it differs


def test_verify_refuses_what_it_cannot_replay_in_one_line(capsys, tmp_path):
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    result = verify(capsys, not_a_checkpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "such as a file of results/shipped/" in result.stderr


def test_verify_runs_this_projects_script_never_the_one_a_checkpoint_names(capsys, tmp_path):
    from mnist_optuna.checkpoints import save_checkpoint
    from mnist_optuna.training import TrainConfig
    from models import build_model

    evil = tmp_path / "elsewhere" / "MNIST-optuna.py"
    evil.parent.mkdir()
    marker = tmp_path / "ran-the-other-script"
    evil.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    out, journal = tmp_path / "run", tmp_path / "study.journal"
    out.mkdir()
    (out / "best_params.json").write_text('{"trial": 0, "study_seed": 0}')
    journal.write_text("")
    model = build_model({"conv": [{"channels": 4, "kernel": 3, "pool": True, "slope": 0.01, "batch_norm": True}],
                         "fc": [16], "dropout": 0.0})
    command = f"python {evil} --retrain-only --out-dir {out} --storage {journal}"
    save_checkpoint(tmp_path / "m.pt", model, TrainConfig(), {"command": command, "trial": 0, "study_seed": 0})
    result = verify(capsys, tmp_path / "m.pt")
    assert not marker.exists(), "verify ran the script the checkpoint named"
    assert result.returncode == 2 and "the replay ended with exit code" in result.stderr  # ours ran, found no study

    # recorded settings that are not the script's flags: refused before anything runs
    save_checkpoint(tmp_path / "n.pt", model, TrainConfig(),
                    {"command": f"python MNIST-optuna.py --no-such-flag 1 --out-dir {out} --storage {journal}"})
    result = verify(capsys, tmp_path / "n.pt")
    assert result.returncode == 2 and "does not parse as MNIST-optuna.py's settings" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_replay_publishes_nowhere():
    module = load_script("results/verify.py")
    words = ["python", "MNIST-optuna.py", "--mlflow", "sqlite:///m.db", "--artifacts=/team/store", "--epochs", "3",
             "--out-dir", "a", "--ensemble", "3"]
    replay = module.replay_command(words, "scratch", "scratch/s.journal", 1)
    assert replay == ["python", "MNIST-optuna.py", "--epochs", "3", "--out-dir", "scratch", "--storage",
                      "scratch/s.journal", "--final-seeds", "1"]


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
    import torch

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
    replayed = verify(capsys, bad)
    assert replayed.returncode != 0 and "Traceback" not in replayed.stderr and words in replayed.stderr + replayed.stdout
