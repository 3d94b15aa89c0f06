"""deploy/kubernetes/: the manifests pass the Kubernetes API schemas (offline, strict), name only objects they
define, and the worker Job's container command, run as a plain process from the files the Dockerfile puts in the
image, works one study against PostgreSQL."""
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import DATA_DIR, LONG, ROOT, SEARCH, postgres_or_skip, trained_networks

DEPLOY = ROOT / "deploy" / "kubernetes"
# the oldest Kubernetes release the manifests are written for (indexed Jobs and the completion-index annotation are
# stable there) and the newest the validator knows
VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def manifests():
    return [doc for path in sorted(DEPLOY.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind, name=None):
    (found,) = [doc for doc in manifests() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    return found


def worker_container():
    (container,) = one("Job")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_passes_the_kubernetes_schemas_strictly(version):
    docs = manifests()
    assert {doc["kind"] for doc in docs} >= {"Secret", "Service", "StatefulSet", "Job", "Deployment"}
    for doc in docs:  # strict: a misspelt field is an error, not a field the API server drops without a word
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_manifests_refer_only_to_objects_they_define():
    docs = manifests()
    defined = {(doc["kind"], doc["metadata"]["name"]) for doc in docs}
    text = json.dumps(docs)
    for secret in set(re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text)) | set(
            re.findall(r'"secretRef": \{"name": "([^"]+)"', text)):
        assert ("Secret", secret) in defined, secret
    for claim in re.findall(r'"claimName": "([^"]+)"', text):
        assert ("PersistentVolumeClaim", claim) in defined, claim
    secret = one("Secret")["stringData"]
    storage = {env["name"]: env.get("value") for env in worker_container()["env"]}["MNIST_OPTUNA_STORAGE"]
    host = re.match(r"postgresql://([^:]+):\$\(POSTGRES_PASSWORD\)@([^:/]+):5432/(\w+)$", storage)
    assert host, storage  # the user, the database and the Service the workers reach are the ones defined here
    assert host.group(1) == secret["POSTGRES_USER"] and host.group(3) == secret["POSTGRES_DB"]
    assert ("Service", host.group(2)) in defined and one("StatefulSet")["spec"]["serviceName"] == host.group(2)
    for workload in ("StatefulSet", "Deployment"):  # each Service selects the pods of a workload defined here
        labels = one(workload)["spec"]["template"]["metadata"]["labels"]
        assert any(doc["kind"] == "Service" and doc["spec"]["selector"] == labels for doc in docs), workload
    job = one("Job")["spec"]
    assert job["completionMode"] == "Indexed" and job["parallelism"] == job["completions"] >= 2


def image_files(folder):
    """The files the Dockerfile copies into the image, copied the same way into `folder` (its WORKDIR)."""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            for source in sources:
                into = folder / target / (Path(source).name if target.endswith("/") and not source.endswith("/")
                                          else "")
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, folder / target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(ROOT / source, into)
    return folder


def job_command(index, storage, runs):
    """The worker container's command for completion index `index`, its $(VAR)s expanded as the kubelet does; the
    cluster's database URL replaced by `storage` and the runs volume by the folder `runs`."""
    container = worker_container()
    env = {"WORKER": str(index)}
    for variable in container["env"]:
        if "value" in variable:
            env[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], variable["value"])
        elif "secretKeyRef" in variable.get("valueFrom", {}):
            env[variable["name"]] = one("Secret")["stringData"][variable["valueFrom"]["secretKeyRef"]["key"]]
    env["MNIST_OPTUNA_STORAGE"] = storage
    args = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg) for arg in container["args"]]
    return on_volume([sys.executable if part == "python" else part for part in container["command"]] + args,
                     container, runs), env


def on_volume(command, container, runs):
    """The command with the container's one volume mount replaced by the folder `runs`."""
    (mount,) = container["volumeMounts"]
    return [part.replace(mount["mountPath"], str(runs)) for part in command]


@LONG
def test_the_worker_command_of_the_job_runs_a_study_from_the_image_files_against_postgres(tmp_path):
    storage, prefix = postgres_or_skip(), f"k8s-{uuid.uuid4().hex[:8]}"
    app, runs = image_files(tmp_path / "app"), tmp_path / "runs"
    runs.mkdir()  # the volume; then what the pod's init containers of the worker image do on it
    for init in one("Job")["spec"]["template"]["spec"]["initContainers"]:
        if init["image"] == worker_container()["image"]:
            subprocess.run(on_volume(init["command"], init, runs), cwd=app, check=True, timeout=60)
    workers = []
    for index in range(2):  # two pods of the Job, side by side
        command, env = job_command(index, storage, runs)
        workers.append(subprocess.Popen(
            [*command, *SEARCH, "--study-prefix", prefix, "--final-epochs", "1", "--data-dir", str(DATA_DIR)],
            cwd=app, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": ""}))
    for worker in workers:
        output = worker.communicate(timeout=300)[0]
        assert worker.returncode == 0, output
    # the scripts imported the project from the image's files (compiled there), not from this checkout
    compiled = {path.name.split(".")[0] for path in (app / "__pycache__").glob("*.pyc")}
    assert compiled >= {"data", "models", "errors"} and any((app / "mnist_optuna" / "__pycache__").glob("*.pyc"))
    assert len(trained_networks(storage, f"{prefix}-seed0")) == 4  # 2 pods x --n-trials 2, none twice
    summaries = [json.loads((runs / f"worker-{k}" / "summary.json").read_text()) for k in range(2)]
    (ran,) = [k for k, summary in enumerate(summaries) if not summary.get("final_stage_by")]
    assert (runs / f"worker-{ran}" / "model.pt").is_file()
    assert any((runs / "artifacts").rglob("*")), "the final stage uploaded nothing to the Job's artifact store"
