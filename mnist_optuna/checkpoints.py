"""The files a trained network lives in: its checkpoint (network, recipe, weights and what it records), the epoch
checkpoint a stopped training resumes from, and its ONNX export with the parity check against PyTorch."""
import contextlib
import copy
import hashlib
import io
import json
import logging
import math
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from data import CANONICAL_FINGERPRINT
from errors import UserError, first_line
from mnist_optuna.rundir import write_atomic
from models import INPUT_SHAPE, build_model, normalise_config

log = logging.getLogger(__name__)


class EpochCheckpoint:
    """Where a training keeps, at the end of each epoch, everything its continuation needs (weights, optimizer,
    schedule, the moving average with its BatchNorm statistics, the random states of the batch order, augmentation
    and dropout, the history so far), written whole or not at all, so a stopped training resumes from its last
    finished epoch instead of its first step. `identity` (JSON-able: network, recipe, seed, images, data) says what
    is trained: a file of another training is never continued. `name` names the training in the line that says it
    resumes. train() removes the file when the training ends.

    With `store` (an Optuna artifact store the workers share) each epoch's state is also written there, under a
    name made of the identity, so a worker in another run folder or on another machine that takes the training
    over continues it. The store's writes need not be atomic (a file system store writes in place): the epochs go
    to two slots in turn, so a write cut short by a kill leaves the previous epoch whole in the other."""

    STORE_SLOTS = 2

    def __init__(self, path, identity, name="training", on_resume=None, store=None):
        self.path, self.name, self.store = Path(path), name, store
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.resumed_epochs, self.resumed_seconds = 0, 0.0
        self.source = "its checkpoint"  # where the state resumed from came from, for the line that says so
        self.on_resume = on_resume  # on_resume([(step, val_accuracy), ...]): the reports made before the stop
        self.store_failed = False

    def _state(self, read):
        """The state in the bytes `read()` returns when it is of this very training, else None."""
        try:
            content = read()
            if content is None:
                return None
            state = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError):
            return None
        return state if isinstance(state, dict) and state.get("identity") == self.identity else None

    def store_ids(self):
        """The store's names of this training's slots: by a digest of its identity, so the same training finds them
        from any folder and two trainings sharing a store never meet."""
        return [f"epoch-{identity_digest(self.identity)}-slot{k}" for k in range(self.STORE_SLOTS)]

    def load(self):
        """The state saved after the last finished epoch of this very training, or None: this run folder's own,
        else the latest whole one in the shared store."""
        if self.path.is_file():
            state = self._state(self.path.read_bytes)
            if state is not None:
                return state
            log.info(f"{self.name}: {self.path.name} is not a checkpoint of this training; starting from its first "
                     "epoch")
        if self.store is None:
            return None
        found = [self._state(lambda artifact_id=artifact_id: stored_bytes(self.store, artifact_id))
                 for artifact_id in self.store_ids()]
        found = [state for state in found if state is not None]
        if not found:
            return None
        self.source = "its checkpoint in the artifact store (another worker trained those epochs)"
        return max(found, key=lambda state: len(state["history"]))

    @classmethod
    def keyed(cls, folder, kind, identity, name, on_resume=None, store=None):
        """The checkpoint in `folder` of a training known by its identity alone (a promotion, a search trial): its
        file is named by a digest of the identity, so the rerun of the same training finds it."""
        return cls(Path(folder) / f".{kind}-{identity_digest(identity)}.epoch", identity, name, on_resume, store)

    def save(self, state):
        buffer = io.BytesIO()
        torch.save({**state, "identity": self.identity}, buffer)
        write_atomic(self.path, buffer.getvalue())
        if self.store is not None and not self.store_failed:
            slot = self.store_ids()[len(state["history"]) % self.STORE_SLOTS]
            try:
                self.store.write(slot, io.BytesIO(buffer.getvalue()))
            except Exception as error:  # the training goes on; only a takeover elsewhere would start it over
                self.store_failed = True
                log.warning(f"warning: {self.name}: its epoch checkpoint could not be written to the artifact store "
                            f"({first_line(error)}); another worker "
                            "that takes it over starts it from its first epoch")

    def remove(self):
        self.path.unlink(missing_ok=True)
        if self.store is not None:
            for artifact_id in self.store_ids():
                try:
                    self.store.remove(artifact_id)
                except Exception:  # not there (an epoch-one training, an earlier remove), or the store is gone
                    pass


def stored_bytes(store, artifact_id):
    """The bytes of an artifact of an Optuna artifact store, or None: not written (yet), or the store cannot be read
    (then nothing is taken from it)."""
    try:
        with store.open_reader(artifact_id) as reader:
            return reader.read()
    except Exception:
        return None


def identity_digest(identity):
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_checkpoint(path, model, train_cfg, meta):
    """config + state_dict + metadata, serialised in memory and written with write_atomic (so a full disk is an
    OSError like any other write, not an error inside torch's writer)."""
    payload = {"config": model.config, "train": train_cfg.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path, device="cpu"):
    """(model, payload) from a checkpoint written by save_checkpoint."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        problem = payload_problem(payload)
        if problem is None:
            model = build_model(payload["config"])
            model.load_state_dict(payload["state_dict"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError, EOFError,
            pickle.UnpicklingError) as error:
        problem = type(error).__name__
    if problem is not None:
        raise UserError(f"{path} is not a checkpoint of this project ({problem}); "
                        "pass a model.pt written by MNIST-optuna.py or MNIST-optuna-adv.py")
    return model.to(device), payload


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def payload_problem(payload):
    """What makes a loaded checkpoint payload unusable (its parts' types and values, checked before anything reads
    them), or None. A file can be tampered with or come from elsewhere: each case is one line, not a traceback."""
    if not isinstance(payload, dict):
        return f"it holds a {type(payload).__name__}, not a checkpoint's record"
    config, meta = payload.get("config"), payload.get("meta", {})
    if not isinstance(config, dict) or not isinstance(payload.get("state_dict"), dict):
        return "its network or weights are missing"
    classes = config.get("num_classes", 10)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        return f"num_classes {classes!r} is not a number of classes >= 2"
    if not isinstance(meta, dict):
        return f"its meta is a {type(meta).__name__}, not a record"
    for key in ("mean", "std"):
        if key in meta and not _number(meta[key]):
            return f"its normalisation {key} {meta[key]!r} is not a number"
    if "std" in meta and not meta["std"] > 0:
        return f"its normalisation std {meta['std']!r} is not positive"
    for key in ("command", "source", "training_data"):
        if key in meta and not isinstance(meta[key], str):
            return f"its recorded {key} is not text"
    if "train" in payload and not isinstance(payload["train"], dict):
        return "its training recipe is not a record"
    return None


def finished_checkpoint(path, identity, device):
    """(model, meta) of the checkpoint at `path` when it holds exactly the training `identity` names (network,
    recipe, seed, the number of training images and their fingerprint), else None. A checkpoint from before
    fingerprints were recorded was trained on canonical MNIST."""
    if not Path(path).is_file():
        return None
    try:
        model, payload = load_checkpoint(path, device)
    except UserError:
        return None
    meta = payload.get("meta", {})
    same = (payload.get("train") == identity["train"] and model.config == normalise_config(identity["model"])
            and meta.get("seed") == identity["seed"] and meta.get("train_images") == identity["train_images"]
            and "history" in meta and meta.get("training_data", CANONICAL_FINGERPRINT) == identity["training_data"])
    return (model, meta) if same else None


def export_onnx(model, path):
    """Save the model as ONNX (opset of torch's exporter) with a dynamic batch axis; return the path."""
    cpu_model = copy.deepcopy(model).cpu().float().eval()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.export.tmp")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        # the exporter narrates its passes on stdout; the run's own output stays readable without them
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(cpu_model, (torch.zeros(2, *INPUT_SHAPE),), str(tmp), input_names=["image"],
                              output_names=["logits"], dynamic_shapes={"x": {0: batch}}, dynamo=True,
                              external_data=False, verbose=False)
        write_atomic(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_parity(model, path, images):
    """(max |logit difference|, fraction of equal predicted labels) of ONNX Runtime against PyTorch on CPU."""
    import onnxruntime

    cpu_model = copy.deepcopy(model).cpu().float().eval()
    images = images.detach().cpu().float().contiguous()
    with torch.no_grad():
        expected = cpu_model(images).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": images.numpy()})[0]
    return float(np.abs(got - expected).max()), float((got.argmax(1) == expected.argmax(1)).mean())
