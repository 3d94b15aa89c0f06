"""--backbone: the network (and the training recipe) a run starts from, read from a best_params.json or a
model.pt checkpoint, a local path or an artifact id in the --artifacts store."""
import json
from pathlib import Path

from data import NUM_CLASSES
from errors import UserError
from mnist_optuna.checkpoints import load_checkpoint
from mnist_optuna.tracking import local_file, open_artifact_store
from models import build_model, normalise_config


def read_backbone(path, artifacts=None):
    """(model config, training recipe dict or None) from a best_params.json or a model.pt checkpoint, given as a
    path or as an artifact id in the --artifacts store."""
    path = Path(local_file(str(path), open_artifact_store(artifacts), "--backbone"))
    if not path.is_file():
        raise UserError(f"--backbone {path} does not exist; pass a best_params.json or a model.pt")
    if path.suffix == ".pt":
        payload = load_checkpoint(path)[1]
        return checked(path, normalise_config(payload["config"])), payload.get("train")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"--backbone {path} is not valid JSON ({error}); pass the best_params.json "
                        "written by MNIST-optuna.py") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict) or "conv" not in model:
        raise UserError(f"--backbone {path} has no 'model' with 'conv' blocks; pass the best_params.json "
                        "written by MNIST-optuna.py")
    train = payload.get("train")
    return checked(path, normalise_config({"fc": [], **model})), train if isinstance(train, dict) else None


def checked(path, config):
    """The backbone's network, refused before any work when it cannot serve MNIST: another number of classes (a run
    would ship a model with outputs MNIST has no digit for), or conv blocks that do not fit a 28x28 image."""
    if config["num_classes"] != NUM_CLASSES:
        raise UserError(f"--backbone {path} classifies {config['num_classes']} classes, MNIST has {NUM_CLASSES}; pass "
                        "the best_params.json or model.pt of an MNIST run")
    build_model({**config, "fc": []})  # too many pools: its one-line ConfigError, before a trial fails on it
    return config
