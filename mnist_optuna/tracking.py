"""Results where a team looks for them: every trial and the final model as MLflow runs (--mlflow), and the final
files in Optuna's artifact store, on the chosen trial's study (--artifacts), so a model trained by one worker is
found from any machine. Both are checked before any training (one line, exit 2); a failure after that is a
warning, and the study and the run folder stay whole."""
import atexit
import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import optuna

from errors import UserError, first_line
from mnist_optuna.rundir import ROOT, writable_folder

log = logging.getLogger(__name__)


# ---- MLflow ---------------------------------------------------------------------------------------------

class Tracker:
    """MLflow runs through MLflow's client API: one parent run per study, a child run per finished trial, a child
    run for the final model. The client is explicit (no process-global active run), so any number of studies and
    workers log side by side; parents are found again by tag, so every worker of a study shares one."""

    def __init__(self, uri, experiment):
        # fail fast on an unreachable server instead of MLflow's minutes of retries; no telemetry from our runs
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        try:
            import mlflow
        except ImportError as error:
            raise UserError(f"--mlflow needs MLflow ({error}); pip install -r requirements.txt") from None
        # after the import, which sets its own level; MLflow's errors reach us as exceptions, which say it in one
        # line (MLflow would log each with its whole traceback too)
        logging.getLogger("mlflow").setLevel(logging.CRITICAL)
        self.mlflow, self.uri, self.parents, self.broken = mlflow, uri, {}, False
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                self.experiment = self.client.create_experiment(experiment, artifact_location=_artifact_root(uri))
            else:
                self.experiment = found.experiment_id
        except Exception as error:  # MLflow raises many kinds (connection, SQL, bad URI); each means: unusable
            raise UserError(f"cannot use MLflow tracking URI {uri} ({_first_line(error)}); check the URI and that "
                            "the server runs") from None

    def study_run(self, study_name):
        """The id of the study's parent run: found by tag, else created (of two created at once, the older wins)."""
        if study_name in self.parents:
            return self.parents[study_name]
        # found by a hex digest of the name: a name is the user's text (an apostrophe would break the filter)
        key = hashlib.sha256(study_name.encode()).hexdigest()[:16]
        query = f"tags.`mnist_optuna.study_key` = '{key}' and tags.`mnist_optuna.role` = 'study'"

        def oldest():
            runs = self.client.search_runs([self.experiment], filter_string=query, order_by=["attributes.start_time"])
            return runs[0].info.run_id if runs else None

        run_id = oldest()
        if run_id is None:
            mine = self.client.create_run(self.experiment, run_name=study_name, tags={
                "optuna.study": study_name, "mnist_optuna.study_key": key, "mnist_optuna.role": "study"}).info.run_id
            run_id = oldest()
            if run_id != mine:
                self.client.delete_run(mine)
        self.parents[study_name] = run_id
        return run_id

    def child_run(self, study_name, name, tags, params, metrics, status="FINISHED"):
        from mlflow.entities import Metric, Param

        run_id = self.client.create_run(self.experiment, run_name=name, tags={
            "mlflow.parentRunId": self.study_run(study_name), "optuna.study": study_name, **tags}).info.run_id
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()],
                              metrics=[Metric(k, float(v), now, step) for k, v, step in metrics])
        self.client.set_terminated(run_id, status)
        return run_id

    def trial_callback(self, objectives=("accuracy",)):
        """An Optuna callback: each finished trial becomes a child run of its study's parent run (parameters, the
        objective values, state, MMAC, seed, study name and seed). A tracking failure is a warning."""
        def callback(study, trial):
            values = dict(zip(objectives, trial.values or []))
            tags = {"optuna.trial": str(trial.number), "state": trial.state.name,
                    **{k: str(trial.user_attrs[k]) for k in ("seed", "mmac", "reason", "study") if
                       trial.user_attrs.get(k) is not None}}
            metrics = [(f"val_{k}" if k == "accuracy" else k, v, 0) for k, v in values.items() if v is not None]
            metrics += [("val_accuracy_at_step", v, step) for step, v in sorted(trial.intermediate_values.items())]
            if trial.user_attrs.get("mmac") is not None and "mmac" not in values:
                metrics.append(("mmac", trial.user_attrs["mmac"], 0))
            status = {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(trial.state.name, "FAILED")
            self.guard("trial", lambda: self.child_run(study.study_name, f"trial {trial.number}", tags, trial.params,
                                                         metrics, status))
        return callback

    def log_final(self, study_name, trial, summary, model, files):
        """The final model as a child run: its test accuracy, its training curves per epoch, the files, and the
        model itself through mlflow.pytorch (loadable with mlflow.pytorch.load_model('runs:/<id>/model'))."""
        history = summary.get("final_history") or []
        metrics = [("test_accuracy", summary["test_accuracy"], 0)]
        for record in history:
            metrics += [(k, record[k], record["epoch"]) for k in ("train_loss", "train_accuracy", "val_accuracy")
                        if record.get(k) is not None]
        tags = {"mnist_optuna.role": "final", "optuna.trial": str(trial.number),
                "seed": str(trial.user_attrs.get("seed"))}
        run_id = self.child_run(study_name, f"final (trial {trial.number})", tags,
                                {**trial.params, "final_epochs": len(history)}, metrics, status="RUNNING")
        for path in files:
            self.client.log_artifact(run_id, str(path), artifact_path="plots" if path.suffix == ".png" else None)
        self.mlflow.set_tracking_uri(self.uri)
        with self.mlflow.start_run(run_id=run_id):
            # pickled with the two modules it needs, so it loads on any machine with torch
            self.mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                          code_paths=[str(ROOT / "models.py"), str(ROOT / "errors.py")],
                                          pip_requirements=["torch"])
        return run_id

    def guard(self, what, action):
        """action(), or None when MLflow fails: one warning, and no more MLflow calls in this run (a store that went
        away fails every later call too, each with its own retries and messages)."""
        if self.broken:
            return None
        try:
            return action()
        except Exception as error:  # the search goes on; MLflow is a copy, the study is the record
            self.broken = True
            log.warning(f"warning: MLflow logging of the {what} failed ({_first_line(error)}); no more MLflow "
                        "logging in this run, the study and the run folder keep everything")
            return None


def _artifact_root(uri):
    """A local tracking database keeps its artifacts beside it (MLflow's default is ./mlruns in the working
    folder); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def _first_line(error):
    """The first line of what went wrong: of the innermost cause (a database error wrapped by its library's)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return first_line(error)


# ---- Optuna's artifact store -----------------------------------------------------------------------------

def open_artifact_store(spec):
    """--artifacts: a folder (shared by the workers: NFS, a mounted bucket) or s3://BUCKET (boto3, S3-compatible)."""
    if spec is None:
        return None
    if spec.startswith("s3://"):
        try:
            import boto3
        except ImportError:
            raise UserError("--artifacts s3://… needs boto3: pip install boto3") from None
        return optuna.artifacts.Boto3ArtifactStore(spec[len("s3://"):].strip("/"), client=boto3.client("s3"))
    if not Path(spec).is_dir():  # a shared folder exists already: a mistyped name is not made into a new one
        raise UserError(f"--artifacts {spec} is not a folder; pass the folder the workers share (create it first) "
                        "or s3://BUCKET")
    folder = writable_folder(spec, "--artifacts", "pass a writable folder")
    return optuna.artifacts.FileSystemArtifactStore(str(folder))


def upload(store, storage, trial, files):
    """Attach the files to the study of the chosen trial in the artifact store (Optuna refuses to change a finished
    trial, so the study holds them) and record which trial they belong to; {file name: artifact id}."""
    study = optuna.load_study(study_name=trial.user_attrs.get("study"), storage=storage)
    ids = {Path(path).name: optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(path),
                                                              study_or_trial=study)
           for path in files}
    study.set_user_attr("final_artifacts", {"trial": trial.number, "artifacts": ids})
    return ids


def local_file(text, store, what):
    """A path as given when it exists; otherwise an artifact id in --artifacts, downloaded to a temporary file."""
    if Path(text).exists() or store is None:
        return text
    folder = Path(tempfile.mkdtemp(prefix="mnist-optuna-artifact-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the run reads it; nothing is left after the run
    target = folder / text
    try:
        optuna.artifacts.download_artifact(artifact_store=store, file_path=str(target), artifact_id=text)
    except Exception as error:  # the store says "not found" in its own way
        raise UserError(f"{what} {text} is neither a file nor an artifact id in --artifacts "
                        f"({_first_line(error)})") from None
    # the readers go by suffix: a best_params.json is JSON text, a model.pt a zip archive
    with open(target, "rb") as file:
        suffix = ".json" if file.read(1) == b"{" else ".pt"
    return str(target.rename(target.with_name(text + suffix)))


def publish(run, trial, summary, model, files):
    """The final model where the team looks: an MLflow run (the run's tracker) and/or the chosen trial's artifacts
    (its artifact store). Returns what was published ({"mlflow_run": id, "artifacts": {name: id}}); a failure is a
    warning, the run folder has it all."""
    tracker, store, storage, out_dir = run.tracker, run.artifacts, run.storage, run.out_dir
    published = {}
    if tracker is not None:
        run_id = tracker.guard("final model", lambda: tracker.log_final(trial.user_attrs.get("study"), trial,
                                                                          summary, model, files))
        if run_id:
            published["mlflow_run"] = run_id
            print(f"mlflow: final model in run {run_id} of {tracker.uri} "
                  f"(mlflow.pytorch.load_model('runs:/{run_id}/model'))")
    if store is not None:
        try:
            published["artifacts"] = upload(store, storage, trial, files)
        except Exception as error:
            log.warning(f"warning: upload to the artifact store failed ({_first_line(error)}); the run folder "
                        f"{out_dir} keeps every file")
        else:
            ids = published["artifacts"]
            print(f"artifacts: in study {trial.user_attrs.get('study')} (for its trial {trial.number}): "
                  + ", ".join(f"{name} {artifact}" for name, artifact in ids.items() if not name.endswith(".png"))
                  + (f" (+{sum(n.endswith('.png') for n in ids)} plots)" if any(n.endswith(".png") for n in ids)
                     else ""))
    return published


def published_text(published):
    """One line naming where another worker's final results are."""
    parts = []
    if published.get("artifacts"):
        parts.append("model.pt artifact " + str(published["artifacts"].get("model.pt")))
    if published.get("mlflow_run"):
        parts.append(f"MLflow run {published['mlflow_run']}")
    return ", ".join(parts) or "its run folder only (no --artifacts or --mlflow)"
