"""A stop costs an epoch, not a training: the final retrain, an ensemble member and a promotion keep their state after
each epoch, and a rerun continues from the last finished one, to the last bit of an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DATA_DIR, LONG, ROOT, TINY, TINY_CNN, run_in_process
from mnist_optuna.checkpoints import EpochCheckpoint
from mnist_optuna.training import TrainConfig, seed_everything, train
from models import build_model

CONFIG = {"conv": [{"channels": 4, "kernel": 3, "pool": True, "slope": 0.01, "batch_norm": True}], "fc": [16],
          "dropout": 0.3, "num_classes": 10}


def toy_data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 1, 28, 28, generator=generator).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (600,), generator=generator)


class Stop(Exception):
    pass


def toy_training(cfg, checkpoint=None, stop_after=None):
    """CONFIG trained on the toy data with seed 7, stopped (Stop) after epoch `stop_after`; (model, history)."""
    x, y = toy_data()
    seed_everything(7)
    model = build_model(CONFIG)

    def on_epoch(record):
        if record["epoch"] == stop_after:
            raise Stop()
    history = train(model, x, y, cfg, 7, val=(x[:200], y[:200]), on_epoch=on_epoch, checkpoint=checkpoint)
    return model, history


@pytest.mark.parametrize("recipe", [dict(ema=0.5, augment=True, label_smoothing=0.1),
                                    dict(optimizer="sgd", schedule="cosine"), dict(schedule="none")],
                         ids=["ema-augment-onecycle", "sgd-cosine", "adamw-constant"])
def test_a_training_stopped_after_an_epoch_resumes_to_the_last_bit(tmp_path, recipe):
    cfg = TrainConfig(epochs=4, batch_size=50, **recipe)

    def run(checkpoint=None, stop_after=None):
        return toy_training(cfg, checkpoint, stop_after)

    whole, whole_history = run()
    path = tmp_path / ".t.epoch"
    with pytest.raises(Stop):
        run(EpochCheckpoint(path, {"what": "t"}), stop_after=2)
    assert path.is_file()
    resumed = EpochCheckpoint(path, {"what": "t"})
    model, history = run(resumed)
    assert resumed.resumed_epochs == 2 and not path.exists()  # resumed after epoch 2, removed at the end
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), model.state_dict().values()))
    assert [r["val_accuracy"] for r in history] == [r["val_accuracy"] for r in whole_history]
    assert history[-1]["val_correct"] == whole_history[-1]["val_correct"]

    # a checkpoint of another training is never continued
    with pytest.raises(Stop):
        run(EpochCheckpoint(path, {"what": "t"}), stop_after=1)
    other = EpochCheckpoint(path, {"what": "another"})
    run(other)
    assert other.resumed_epochs == 0


def killed_when(command, ready, timeout=240):
    """Start `command` with this process's torch thread count (what it trains then replays here to the last bit),
    SIGKILL it as soon as `ready()`; True when it was killed so (False: it ended first)."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if ready():
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return True
            time.sleep(0.02)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@LONG
def test_a_final_stage_killed_mid_training_resumes_from_the_last_epoch_to_the_last_bit(capsys, tmp_path):
    args = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--final-epochs", "3", "--final-subset", "2000",
            "--ensemble", "2", "--no-plots"]
    whole = run_in_process(capsys, "MNIST-optuna.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *args, "--out-dir", str(out), "--data-dir",
               str(DATA_DIR)]
    staged = out / ".final-stage"
    # killed in the ensemble member's training (model.pt is finished by then) right after an epoch's checkpoint;
    # model.pt's own training resumes through the same code (retrain_and_test)
    assert killed_when(command, lambda: (staged / ".ensemble-1.pt.epoch").exists())
    rerun = run_in_process(capsys, "MNIST-optuna.py", *args, "--out-dir", out)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in rerun.stdout.splitlines() + rerun.stderr.splitlines() if "resuming after epoch" in line]
    assert len(resumed) == 1 and resumed[0].startswith("ensemble-1.pt: resuming after epoch ")
    epoch = int(resumed[0].split("resuming after epoch ")[1].split()[0])
    assert 1 <= epoch < 3
    for name in ("model.pt", "ensemble-1.pt"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)["state_dict"]
        b = torch.load(out / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(out.glob(".*.epoch")) and not staged.exists()


_UNINTERRUPTED_TRIAL = []


@pytest.mark.parametrize("taken_over", [False, True], ids=["rerun-in-its-folder", "another-worker-through-the-store"])
def test_a_search_trial_killed_mid_training_resumes_in_its_retry_with_the_same_reports_and_value(
        capsys, tmp_path, taken_over):
    """Killed after an epoch: the same command in the same folder continues the trial from its folder's checkpoint;
    a worker in another run folder, on the same journal and artifact store (as on another machine), takes the lost
    trial over and continues it from the checkpoint in the store."""
    import optuna

    from mnist_optuna.storages import make_storage

    args = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "1", "--epochs", "4", "--train-subset", "4000",
            "--pruner", "none", "--no-final", "--no-plots"]
    out, store, journal = tmp_path / "killed", tmp_path / "store", tmp_path / "shared.journal"
    shared = ["--storage", str(journal), "--artifacts", str(store)] if taken_over else []
    store.mkdir()
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *args, *shared, "--out-dir", str(out), "--data-dir",
               str(DATA_DIR)]
    # killed after the trial's first epoch: its checkpoint is in the store, or in its folder
    written = (store, "epoch-*-slot1") if taken_over else (out, ".trial-*.epoch")
    assert killed_when(command, lambda: any(written[0].glob(written[1]))), \
        "the trial ended before its first epoch checkpoint was seen"
    rerun = run_in_process(capsys, "MNIST-optuna.py", *args, *shared,
                           "--out-dir", tmp_path / "other-worker" if taken_over else out)
    assert rerun.returncode == 0, rerun.stderr
    resumed = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "resuming after epoch" in line]
    assert len(resumed) == 1 and resumed[0].startswith("trial 1: resuming after epoch "), resumed
    assert ("in the artifact store" in resumed[0]) == taken_over and "not bit-identical" not in resumed[0], resumed

    def finished(folder):
        study = optuna.load_study(study_name="mnist-cnn-seed0", storage=make_storage(
            str(journal) if taken_over and folder == out else None, folder, must_exist=True))
        return [t for t in study.trials if t.state.name == "COMPLETE"]
    if not _UNINTERRUPTED_TRIAL:  # an uninterrupted run of the same trial, once for both cases
        whole = run_in_process(capsys, "MNIST-optuna.py", *args, "--out-dir", tmp_path / "whole")
        assert whole.returncode == 0, whole.stderr
        _UNINTERRUPTED_TRIAL.extend(finished(tmp_path / "whole"))
    [expected], [retried] = _UNINTERRUPTED_TRIAL, finished(out)
    assert retried.params == expected.params and retried.number == 1  # trial 0 was lost to the kill
    assert retried.value == expected.value and retried.intermediate_values == expected.intermediate_values
    assert retried.user_attrs["validation"] == expected.user_attrs["validation"]
    assert not list(out.glob(".trial-*.epoch")) or taken_over  # (the killed worker's own copy stays in its folder)
    assert not list(store.iterdir())  # the finished training removed its checkpoint from the store


def test_an_epoch_checkpoint_in_a_shared_store_is_continued_from_another_folder_even_after_a_torn_write(tmp_path):
    import optuna

    cfg = TrainConfig(epochs=4, batch_size=50, ema=0.5)
    store = optuna.artifacts.FileSystemArtifactStore(tmp_path / "store")
    (tmp_path / "store").mkdir()

    def run(checkpoint=None, stop_after=None):
        return toy_training(cfg, checkpoint, stop_after)[0]

    whole = run()
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
    with pytest.raises(Stop):
        run(EpochCheckpoint(tmp_path / "a" / ".t.epoch", {"what": "t"}, store=store), stop_after=3)
    slots = EpochCheckpoint(tmp_path / "a" / ".t.epoch", {"what": "t"}, store=store).store_ids()
    newest = tmp_path / "store" / slots[3 % 2]
    newest.write_bytes(newest.read_bytes()[:1000])  # the kill cut the write of epoch 3 short
    elsewhere = EpochCheckpoint(tmp_path / "b" / ".t.epoch", {"what": "t"}, store=store)
    model = run(elsewhere)
    assert elsewhere.resumed_epochs == 2 and "artifact store" in elsewhere.source  # epoch 2's slot, still whole
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), model.state_dict().values()))
    assert not list((tmp_path / "store").iterdir())
    other = EpochCheckpoint(tmp_path / "c" / ".t.epoch", {"what": "another"}, store=store)
    with pytest.raises(Stop):
        run(EpochCheckpoint(tmp_path / "b" / ".t.epoch", {"what": "t"}, store=store), stop_after=2)
    run(other)  # a training of another identity never continues this one's state
    assert other.resumed_epochs == 0


@LONG
def test_a_final_stage_whose_worker_died_is_continued_by_another_worker_from_the_store(capsys, tmp_path):
    """Worker A runs the final stage on a shared journal and artifact store and is killed after its promotion and
    model.pt's first epoch; worker B, in another run folder (as on another machine), takes the final stage over,
    reads the promotion's scores from the store instead of training the candidates again, and continues model.pt's
    training from the store, to the weights of an uninterrupted run."""
    args = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "2", "--final-epochs", "4", "--final-subset", "2000",
            "--promote", "2", "--promote-epochs", "2", "--no-plots"]
    whole = run_in_process(capsys, "MNIST-optuna.py", *args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    store, journal = tmp_path / "store", tmp_path / "shared.journal"
    store.mkdir()
    shared = ["--storage", str(journal), "--artifacts", str(store)]
    command = [sys.executable, str(ROOT / "MNIST-optuna.py"), *args, *shared, "--out-dir", str(tmp_path / "a"),
               "--data-dir", str(DATA_DIR)]
    # both promotion scores stored (their own epoch slots are gone by then), then model.pt's first epoch
    assert killed_when(command, lambda: len(list(store.glob("promotion-*.json"))) == 2
                       and any(store.glob("epoch-*-slot1"))), "the final training ended before its first epoch"
    other = run_in_process(capsys, "MNIST-optuna.py", *args, *shared, "--retrain-only", "--out-dir", tmp_path / "b")
    assert other.returncode == 0, other.stderr
    lines = (other.stdout + other.stderr).splitlines()
    assert sum(line.startswith("promotion ") and line.endswith("(scored by another worker: from the artifact store)")
               for line in lines) == 2
    resumed = [line for line in lines if "resuming after epoch" in line]
    assert len(resumed) == 1 and resumed[0].startswith("model.pt: resuming after epoch "), resumed
    assert "in the artifact store" in resumed[0] and "not bit-identical" not in resumed[0]
    scores = [json.loads((tmp_path / folder / "promotion.json").read_text()) for folder in ("whole", "b")]
    assert scores[0] == {key: {**value, "seconds": scores[0][key]["seconds"]} for key, value in scores[1].items()}
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(store.glob("epoch-*"))  # the finished training removed its checkpoint from the store
