"""--backbone: the network (and the training recipe) a run starts from, read from a best_params.json or a
model.pt checkpoint, a local path or an artifact id in the --artifacts store."""
import json
from pathlib import Path

from errors import UserError
from mnist_optuna.tracking import local_file, open_artifact_store
from mnist_optuna.training import load_checkpoint
from models import normalise_config


def read_backbone(path, artifacts=None):
    """(model config, training recipe dict or None) from a best_params.json or a model.pt checkpoint, given as a
    path or as an artifact id in the --artifacts store."""
    path = Path(local_file(str(path), open_artifact_store(artifacts), "--backbone"))
    if not path.is_file():
        raise UserError(f"--backbone {path} does not exist; pass a best_params.json or a model.pt")
    if path.suffix == ".pt":
        payload = load_checkpoint(path)[1]
        return normalise_config(payload["config"]), payload.get("train")
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
    return normalise_config({"fc": [], **model}), train if isinstance(train, dict) else None
