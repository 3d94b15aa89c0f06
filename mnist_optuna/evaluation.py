"""--evaluate: saved checkpoints scored on the test set (each as its run scored it), with their size, MACs and, for
several, their averaged-softmax ensemble; and the reading of the test set itself, which only the final stage and
this command do."""
import torch

from data import normalise, read_split, resolve_data_dir, training_statistics
from errors import UserError
from mnist_optuna.checkpoints import load_checkpoint
from mnist_optuna.devices import resolve_device
from mnist_optuna.reporting import Stopwatch
from mnist_optuna.tracking import local_file, open_artifact_store
from mnist_optuna.training import predict_logits
from models import count_macs, count_parameters


def load_test(data_dir, device, mean, std):
    """The test set, normalised with the training statistics: read only after the search and its choice."""
    images, labels = read_split(data_dir, "test")
    return normalise(images, mean, std, device), labels.to(device)


def evaluate_checkpoints(paths, data_dir, device):
    """For each checkpoint: its test accuracy, parameter count, MACs per image, metadata, the test labels and
    its softmax over the test set (each normalised with the training statistics its checkpoint records)."""
    members = []
    for path in paths:
        model, payload = load_checkpoint(path, device)
        meta = payload.get("meta", {})
        mean, std = (meta["mean"], meta["std"]) if "mean" in meta else training_statistics(data_dir)
        test_x, test_y = load_test(data_dir, device, mean, std)
        # scored as its run scored it: with shift TTA when that run chose it
        probabilities = torch.softmax(predict_logits(model, test_x, tta=bool(meta.get("tta")),
                                                     background=-mean / std), 1)
        members.append({"accuracy": (probabilities.argmax(1) == test_y).float().mean().item(), "labels": test_y,
                        "probabilities": probabilities, "parameters": count_parameters(model),
                        "macs": count_macs(model), "meta": meta})
    return members


def labelled(meta):
    """The label of a checkpoint's results: augmentation in its training, shift TTA in its scoring."""
    return ((" (with augmentation)" if meta.get("augment") else "") + (" (shift TTA)" if meta.get("tta") else ""))


def ensemble_accuracy(members):
    """Accuracy of the averaged softmax of evaluate_checkpoints' members."""
    probabilities = sum(member["probabilities"] for member in members) / len(members)
    return (probabilities.argmax(1) == members[0]["labels"]).float().mean().item()


def evaluate_command(paths, data_dir=None, device="auto", artifacts=None):
    """--evaluate PATH [PATH ...] of either script (a path, or an artifact id in the --artifacts store): see
    print_evaluation."""
    store = open_artifact_store(artifacts)
    local = [local_file(path, store, "--evaluate") for path in paths]
    return print_evaluation(local, resolve_data_dir(data_dir), resolve_device(device), shown=paths)


def print_evaluation(paths, data_dir, device, shown=None):
    """--evaluate: each checkpoint's test accuracy, size and MACs; for several, their averaged-softmax ensemble's."""
    clock = Stopwatch()
    members = evaluate_checkpoints(paths, data_dir, device)
    lines = []
    for path, member in zip(shown or paths, members):
        label = labelled(member["meta"])
        name = f"{path}: " if len(paths) > 1 else ""
        lines.append(f"{name}test accuracy: {100 * member['accuracy']:.2f} %{label}   parameters: "
                     f"{member['parameters']:,}   MMAC/image: {member['macs'] / 1e6:.1f}")
    if len(paths) > 1:
        classes = {path: member["probabilities"].shape[1] for path, member in zip(shown or paths, members)}
        if len(set(classes.values())) > 1:
            raise UserError("--evaluate: an ensemble needs members with one set of classes; "
                            + ", ".join(f"{path} has {n}" for path, n in classes.items())
                            + ": pass checkpoints of one task")
        label = labelled({key: any(m["meta"].get(key) for m in members) for key in ("augment", "tta")})
        lines.append(f"ensemble of {len(paths)} (averaged softmax): ensemble test accuracy: "
                     f"{100 * ensemble_accuracy(members):.2f} %{label}   MMAC/image: "
                     f"{sum(m['macs'] for m in members) / 1e6:.1f}")
    print("\n".join(lines) + f"   ({clock.seconds():.1f} s)")
    return 0
