"""Results a team finds: MLflow runs (--mlflow), Optuna's artifact store (--artifacts), one final stage per study."""
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch

from conftest import DATA_DIR, LONG, POSTGRES, TINY, TINY_CNN, assert_one_line_error, finish, run_script, start
from errors import UserError
from mnist_optuna import tracking, workers
from mnist_optuna.backbone import read_backbone
from mnist_optuna.checkpoints import load_checkpoint
from mnist_optuna.evaluation import load_test
from mnist_optuna.storages import make_storage
from mnist_optuna.training import predict_logits

pytestmark = pytest.mark.timeout(600)
SEARCH = [*TINY, *TINY_CNN, "--seeds", "0", "--n-trials", "3", "--promote", "0"]


def journal_study(out, name="mnist-cnn-seed0"):
    return optuna.load_study(study_name=name, storage=make_storage(None, out))


@LONG
def test_mlflow_and_the_artifact_store_hold_every_trial_and_the_final_model(tmp_path):
    import mlflow

    out, db, store = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "artifacts"
    store.mkdir()
    result = run_script("MNIST-optuna.py", *SEARCH, "--out-dir", out, "--mlflow", f"sqlite:///{db}",
                        "--artifacts", store)
    assert result.returncode == 0, result.stderr
    study = journal_study(out)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("mnist-cnn").experiment_id
    runs = client.search_runs([experiment])
    trial_runs = {int(r.data.tags["optuna.trial"]): r for r in runs if r.data.tags.get("state")}
    finished = [t for t in study.trials if t.state.is_finished()]
    assert sorted(trial_runs) == [t.number for t in finished]
    parents = {r.data.tags["mlflow.parentRunId"] for r in trial_runs.values()}
    assert len(parents) == 1 and client.get_run(parents.pop()).data.tags["optuna.study"] == study.study_name
    for trial in finished:
        run = trial_runs[trial.number]
        assert run.data.params == {k: str(v) for k, v in trial.params.items()}
        assert run.data.tags["state"] == trial.state.name and run.data.tags["seed"] == str(trial.user_attrs["seed"])
        if trial.state.name == "COMPLETE":
            assert run.data.metrics["val_accuracy"] == pytest.approx(trial.value)
        # the trial's validation curve: one value per report, at its step
        curve = client.get_metric_history(run.info.run_id, "val_accuracy_at_step")
        assert sorted((m.step, m.value) for m in curve) == \
            [(step, pytest.approx(value)) for step, value in sorted(trial.intermediate_values.items())]
        assert trial.state.name != "COMPLETE" or len(curve) >= 1

    # the final model: MLflow gives it back and it predicts like model.pt
    final = [r for r in runs if r.data.tags.get("mnist_optuna.role") == "final"]
    assert len(final) == 1 and final[0].data.metrics["test_accuracy"] > 0.5
    assert len(client.get_metric_history(final[0].info.run_id, "train_loss")) == 1  # one per final epoch
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    logged = mlflow.pytorch.load_model(f"runs:/{final[0].info.run_id}/model")
    model, payload = load_checkpoint(out / "model.pt")
    images = load_test(DATA_DIR, torch.device("cpu"), payload["meta"]["mean"], payload["meta"]["std"])[0][:100]
    assert (predict_logits(logged, images) - predict_logits(model, images)).abs().max() < 1e-5

    # the artifact store: model.pt comes back byte for byte; --evaluate takes its artifact id
    attached = study.user_attrs["final_artifacts"]
    assert attached["trial"] == json.loads((out / "best_params.json").read_text())["trial"]
    fetched = tmp_path / "fetched.pt"
    optuna.artifacts.download_artifact(artifact_store=optuna.artifacts.FileSystemArtifactStore(str(store)),
                                       file_path=str(fetched), artifact_id=attached["artifacts"]["model.pt"])
    assert fetched.read_bytes() == (out / "model.pt").read_bytes()
    # --evaluate and --backbone take an artifact id: it becomes a local file of the right kind
    store_object = tracking.open_artifact_store(str(store))
    as_file = tracking.local_file(attached["artifacts"]["model.pt"], store_object, "--evaluate")
    assert as_file.endswith(".pt") and Path(as_file).read_bytes() == (out / "model.pt").read_bytes()
    network, _ = read_backbone(attached["artifacts"]["best_params.json"], str(store))
    assert network == json.loads((out / "best_params.json").read_text())["model"]



def test_an_unusable_tracker_or_store_is_one_line_before_any_work(run_here, tmp_path):
    # checked before the run folder, the storage or the data are touched
    with pytest.raises(UserError, match="MLflow"):
        tracking.Tracker("bogus://nowhere", "x")
    with pytest.raises(UserError, match="--artifacts"):
        tracking.open_artifact_store("/proc/no-such-folder")
    with pytest.raises(UserError, match="create it first"):  # a mistyped folder is not made
        tracking.open_artifact_store(str(tmp_path / "typo"))
    assert not (tmp_path / "typo").exists()
    fresh = run_here("MNIST-optuna.py", *SEARCH, "--out-dir", tmp_path / "new", "--mlflow", "http://127.0.0.1:9")
    assert "MLflow" in assert_one_line_error(fresh)
    assert not (tmp_path / "new").exists()


@pytest.fixture
def shared_storage(tmp_path):
    """PostgreSQL where there is one (CI always), else a shared journal file."""
    return POSTGRES or str(tmp_path / "shared.journal")


def test_two_workers_run_one_final_stage_and_a_third_finds_the_model(shared_storage, tmp_path):
    storage = shared_storage
    name = f"final-{uuid.uuid4().hex[:8]}"
    (tmp_path / "shared").mkdir()
    common = [*SEARCH, "--storage", storage, "--study-prefix", name, "--artifacts", tmp_path / "shared"]
    workers = [start("MNIST-optuna.py", *common, "--out-dir", tmp_path / f"w{i}") for i in range(2)]
    outputs = []
    for worker in workers:
        code, output = finish(worker)
        assert code == 0, output
        outputs.append(output)
    trained = [o for o in outputs if "test accuracy:" in o]
    assert len(trained) == 1, outputs
    other = next(o for o in outputs if o is not trained[0])
    study = optuna.load_study(study_name=f"{name}-seed0", storage=make_storage(storage, tmp_path))
    model_id = study.user_attrs["final_artifacts"]["artifacts"]["model.pt"]
    assert model_id in other and "final stage: already run by worker" in other
    # the line names the folder of the worker that ran it
    ran = next(i for i, o in enumerate(outputs) if o is trained[0])
    assert f"(run folder {tmp_path / f'w{ran}'})" in other
    # a third process that ran no trial finds the model through the study alone
    fetched = tmp_path / "third.pt"
    attached = optuna.load_study(study_name=f"{name}-seed0", storage=make_storage(storage, tmp_path)).user_attrs
    shared = optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "shared"))
    optuna.artifacts.download_artifact(artifact_store=shared, file_path=str(fetched),
                                       artifact_id=attached["final_artifacts"]["artifacts"]["model.pt"])
    winner = next(i for i, o in enumerate(outputs) if o is trained[0])
    assert fetched.read_bytes() == (tmp_path / f"w{winner}" / "model.pt").read_bytes()


def test_a_final_stage_waits_for_a_live_claim_and_takes_over_a_dead_one(tmp_path):
    storage = make_storage(str(tmp_path / "claims.journal"), tmp_path)
    first = workers.FinalStageClaim(storage, "s", "key", "run-a")
    assert first.acquire() is None
    workers.FinalStageClaim.POLL_SECONDS = 0.2
    second = workers.FinalStageClaim(storage, "s", "key", "run-b")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(claim=second.acquire()))
    waiter.start()
    time.sleep(2)
    assert waiter.is_alive()  # a live claim: the second worker waits instead of training the same model
    first.release({"artifacts": {"model.pt": "id-1"}})
    waiter.join(timeout=30)
    assert result["claim"].user_attrs["published"] == {"artifacts": {"model.pt": "id-1"}}

    # a claim whose process is gone is taken over at once
    third = workers.FinalStageClaim(storage, "s", "other key", "run-c")
    assert third.acquire() is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    third.mine.set_user_attr("worker", f"{socket.gethostname()}:{gone.stdout.strip()}")
    third.beating.set()
    fourth = workers.FinalStageClaim(storage, "s", "other key", "run-d")
    assert fourth.acquire() is None and fourth.mine is not None
    fourth.release({})


def test_mlflow_takes_a_study_name_with_an_apostrophe_and_a_lost_store_is_one_warning(tmp_path, capsys, caplog):
    import shutil

    from mnist_optuna import tracking

    store = tmp_path / "ml"
    store.mkdir()
    tracker = tracking.Tracker(f"sqlite:///{store}/mlflow.db", "bob's")
    study = optuna.create_study(study_name="bob's-seed0")
    callback = tracker.trial_callback()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2, callbacks=[callback])
    runs = tracker.client.search_runs([tracker.experiment])
    assert len(runs) == 3 and sum(run.data.tags.get("mnist_optuna.role") == "study" for run in runs) == 1
    shutil.rmtree(store)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3, callbacks=[callback])
    output = capsys.readouterr()
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "MLflow" in r.getMessage()]
    assert len(warnings) == 1 and "Traceback" not in output.out + output.err + caplog.text
