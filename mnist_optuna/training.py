"""The one train/evaluate loop: optimizers, L1/L2, LR schedules, bf16 autocast, the moving average of the weights,
shift TTA, seeding, time estimates, and the retrain of a network from scratch to its checkpoint."""
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import CANONICAL_FINGERPRINT, EVAL_BATCH, batches, random_affine
from errors import UserError
from mnist_optuna.checkpoints import (
    EpochCheckpoint,
    finished_checkpoint,
    save_checkpoint,
)
from mnist_optuna.devices import PRECISIONS
from mnist_optuna.scores import scores_of_logits
from models import INPUT_SHAPE, build_model, normalise_config

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle")


@dataclass
class TrainConfig:
    """Optimization and regularization hyperparameters of one training run."""
    epochs: int = 3
    batch_size: int = 128
    optimizer: str = "adamw"      # adam | adamw | sgd (with momentum)
    lr: float = 3e-3              # peak learning rate for one-cycle
    momentum: float = 0.9         # SGD only
    weight_decay: float = 5e-4    # L2, through the optimizer
    l1: float = 0.0               # explicit L1 penalty over weights, added to the loss
    schedule: str = "onecycle"    # none | cosine | onecycle
    label_smoothing: float = 0.0
    augment: bool = False         # small random affine per image, on the device (results are labelled)
    compile: bool = False         # torch.compile the model: speed on a GPU, the same maths
    precision: str = "fp32"       # fp32 | bf16: bf16 autocast of the forward pass in training (weights stay fp32)
    ema: float = 0.0              # > 0: evaluate and keep an exponential moving average of the weights over about
                                  # this many epochs instead of the last weights; 0: the last weights

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer {self.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule {self.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch size must be at least 1")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.l1 >= 0 and 0 <= self.label_smoothing < 1):
            raise UserError("need lr > 0, weight decay >= 0, L1 >= 0 and label smoothing in [0, 1)")
        if self.precision not in PRECISIONS[1:]:
            raise UserError(f"precision {self.precision!r} is unknown here; choose one of {', '.join(PRECISIONS[1:])}")
        if not self.ema >= 0:
            raise UserError("the EMA horizon must be >= 0 epochs (0: no weight averaging)")

    @classmethod
    def from_dict(cls, values):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self):
        return asdict(self)


class Divergence(Exception):
    """The loss became NaN or infinite."""


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts):
    """A well-mixed 31-bit seed from integers (for example a study seed and a trial number)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)



def l1_penalty(model):
    """Sum of |w| over the weights of conv and linear layers (not biases, not norm parameters)."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(w.abs().sum() for w in weights)


def make_optimizer(model, cfg):
    params = model.parameters()
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def make_scheduler(optimizer, cfg, steps_per_epoch):
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=0.25, anneal_strategy="linear")
    return None


def autocast(device, precision):
    """The forward pass of training in bf16 (no loss scaling needed, weights and optimizer stay fp32), or fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# test-time augmentation: the image itself and the four one-pixel shifts (never flips: a flipped digit is another)
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shifted(x, dy, dx, background):
    """Images moved by (dy, dx) pixels, what moves in from the border being blank background."""
    if not (dy or dx):
        return x
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=background)
    side_y, side_x = x.shape[-2:]
    return padded[..., 1 - dy:1 - dy + side_y, 1 - dx:1 - dx + side_x].contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_logits(model, x, batch_size=EVAL_BATCH, tta=False, background=0.0):
    """Logits of `model` for images `x`, in fp32 whatever precision trained it (so a checkpoint scores alike
    everywhere). With `tta`: the log of the softmax averaged over the image and its four one-pixel shifts."""
    model.eval()
    outputs = []
    for xb, _ in batches(x, x, batch_size, drop_last=False):
        if tta:
            mean = sum(torch.softmax(model(shifted(xb, dy, dx, background)).float(), 1) for dy, dx in TTA_SHIFTS)
            outputs.append(torch.log(mean / len(TTA_SHIFTS)))
        else:
            outputs.append(model(xb).float())
    return torch.cat(outputs)


def accuracy_on(model, x, y, batch_size=EVAL_BATCH, tta=False, background=0.0):
    """Accuracy in [0, 1]."""
    return (predict_logits(model, x, batch_size, tta, background).argmax(1) == y).float().mean().item()


BN_IMAGES = 4096  # training images whose statistics the averaged weights' BatchNorm layers get


def weight_average(model, cfg, steps_per_epoch):
    """torch's AveragedModel keeping an exponential moving average of the weights over about cfg.ema epochs (at
    most a fifth of the whole training, so a short one is not dragged back to its first steps), or None without
    cfg.ema. Its BatchNorm statistics are not averaged: fit_batchnorm measures them for its weights."""
    if cfg.ema <= 0:
        return None
    decay = 1.0 - 1.0 / max(1.0, min(cfg.ema * steps_per_epoch, cfg.epochs * steps_per_epoch / 5))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))


def fit_batchnorm(model, x, images=BN_IMAGES):
    """The BatchNorm statistics of `model`'s own weights over the first `images` of `x`. Averaged weights need
    them: the running statistics training kept belong to other weights, and an average of those statistics
    matches no weights either (measured: 60 % instead of 96 % validation accuracy after one short epoch)."""
    head = x[:images]
    torch.optim.swa_utils.update_bn([xb for xb, _ in batches(head, head, EVAL_BATCH, drop_last=False)], model)



def last_scores(history):
    """The last validation scores of a history train() returned with `val`: {accuracy, nll, images, correct}."""
    last = history[-1]
    return {"accuracy": last["val_accuracy"], "nll": last["val_nll"], "images": last["val_images"],
            "correct": last["val_correct"]}


def _rng_states(generator, augment_generator):
    states = {"batch_order": generator.get_state(), "torch": torch.get_rng_state()}
    if augment_generator is not None:
        states["augment"] = augment_generator.get_state()
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states, generator, augment_generator):
    generator.set_state(states["batch_order"])
    torch.set_rng_state(states["torch"])
    if augment_generator is not None:
        augment_generator.set_state(states["augment"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train(model, x, y, cfg, seed, val=None, on_report=None, reports_per_epoch=1, on_epoch=None, background=0.0,
          also_last=False, checkpoint=None):
    """Train `model` on (x, y); evaluate on `val` (x, y) `reports_per_epoch` times per epoch.

    on_report(step, val_accuracy) is called after each evaluation, step counting from 1; it may raise
    to stop training (the scripts raise optuna.TrialPruned). on_epoch(record) follows each epoch.
    With cfg.augment, each batch is moved by data.random_affine; `background` is a blank pixel's value.
    With cfg.ema, the moving average of the weights is what is evaluated, and what `model` holds at the
    end; `also_last` adds the last weights' validation accuracy to each record (val_accuracy_last).
    Returns the per-epoch history.
    Each record with a validation score also has its negative log-likelihood (val_nll); the last record has which
    validation images the last evaluation got right (val_correct, packed by scores.pack_correct) and their number
    (val_images), so two models can be compared on the same images without training them again.
    With `checkpoint` (EpochCheckpoint) the state after each epoch is saved there (before on_epoch), a training
    stopped after some epoch continues from it, the same to the last bit as an uninterrupted one on the same
    machine and thread count, and the file is removed at the end.
    Raises Divergence when the loss stops being finite.
    """
    device = x.device
    generator = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator(device=device).manual_seed(seed + 1) if cfg.augment else None
    forward = torch.compile(model) if cfg.compile else model
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(y) // cfg.batch_size if len(y) >= cfg.batch_size else 1
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    report_at = {round(steps_per_epoch * (i + 1) / reports_per_epoch) for i in range(reports_per_epoch)}
    average = weight_average(model, cfg, steps_per_epoch)
    scored = model if average is None else average.module  # the weights a validation score is of
    fitted = False  # the average's BatchNorm statistics belong to its current weights
    history, step, first_epoch, reports = [], 0, 1, []
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if average is not None:
            average.load_state_dict(state["average"])
        _set_rng_states(state["rng"], generator, augment_generator)
        history, step, fitted, reports = state["history"], state["step"], state["fitted"], state.get("reports", [])
        first_epoch = len(history) + 1
        checkpoint.resumed_epochs = len(history)
        checkpoint.resumed_seconds = sum(record["seconds"] for record in history)
        threads = "" if state.get("threads") == torch.get_num_threads() else (
            f"; it trained with {state.get('threads')} torch thread(s), this run has {torch.get_num_threads()}, so "
            "the result is not bit-identical to an uninterrupted run")
        log.info(f"{checkpoint.name}: resuming after epoch {len(history)} of {cfg.epochs} from {checkpoint.source}"
                 f"{threads}")
        if checkpoint.on_resume is not None:
            checkpoint.on_resume([tuple(report) for report in reports])
    for epoch in range(first_epoch, cfg.epochs + 1):
        started, eval_seconds = time.perf_counter(), 0.0
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        val_accuracy = last_accuracy = scores = None
        for batch_index, (xb, yb) in enumerate(batches(x, y, cfg.batch_size, generator), start=1):
            if augment_generator is not None:
                xb = random_affine(xb, augment_generator, background)
            with autocast(device, cfg.precision):
                logits = forward(xb)
                loss = loss_fn(logits.float(), yb)
            if cfg.l1 > 0:
                loss = loss + cfg.l1 * l1_penalty(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if average is not None:
                average.update_parameters(model)
                fitted = False
            # accumulate on the device; the host reads these once per epoch
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
            if val is not None and batch_index in report_at:
                step += 1
                clock = time.perf_counter()
                if average is not None:
                    fit_batchnorm(scored, x)
                    fitted = True
                scores = scores_of_logits(predict_logits(scored, val[0]), val[1])
                val_accuracy = scores["accuracy"]
                if also_last and average is not None:
                    last_accuracy = accuracy_on(model, *val)
                eval_seconds += time.perf_counter() - clock
                if not math.isfinite(loss.item()):
                    raise Divergence(f"loss is {loss.item()} at epoch {epoch}")
                model.train()
                reports.append((step, val_accuracy))
                if on_report is not None:
                    on_report(step, val_accuracy)
        train_loss = (loss_sum / max(seen, 1)).item()
        if not math.isfinite(train_loss):
            raise Divergence(f"training loss is {train_loss} at epoch {epoch}")
        history.append({"epoch": epoch, "train_loss": train_loss, "train_accuracy": correct.item() / max(seen, 1),
                        "val_accuracy": val_accuracy, "seconds": time.perf_counter() - started,
                        "eval_seconds": eval_seconds})
        if scores is not None:
            history[-1]["val_nll"] = scores["nll"]
        if last_accuracy is not None:
            history[-1]["val_accuracy_last"] = last_accuracy
        if checkpoint is not None and epoch < cfg.epochs:  # (a resumed training always has an epoch left to run)
            checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict() if scheduler is not None else None,
                             "average": average.state_dict() if average is not None else None,
                             "rng": _rng_states(generator, augment_generator), "step": step, "fitted": fitted,
                             "history": history, "reports": reports, "threads": torch.get_num_threads()})
        if on_epoch is not None:
            on_epoch(history[-1])
    if scores is not None:
        history[-1].update(val_correct=scores["correct"], val_images=scores["images"])
    if average is not None:  # the averaged weights, with their own BatchNorm statistics, are the trained model
        if not fitted:  # (the last report after the last step measured them already)
            fit_batchnorm(scored, x)
        model.load_state_dict(average.module.state_dict())
    if checkpoint is not None:
        checkpoint.remove()
    return history


def training_seconds(model_config, cfg, device, images, evaluations=0, steps=4):
    """About how long training `model_config` with `cfg` on `images` images takes here, `evaluations` validation
    images included: a few warmed-up steps of a throwaway copy on random images, extrapolated. Seeds nothing
    that a training uses (every training seeds itself first)."""
    generator = torch.Generator().manual_seed(0)
    model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(cfg.batch_size, *INPUT_SHAPE, generator=generator).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (cfg.batch_size,), generator=generator).to(device)

    def step():
        with autocast(device, cfg.precision):
            loss = loss_fn(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    per_image = (time.perf_counter() - started) / (steps * cfg.batch_size)
    # a forward pass for evaluation costs about a third of a training step (forward + backward)
    return per_image * (images * cfg.epochs + evaluations / 3)


def minutes(seconds):
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"



def retrain_and_test(model_config, train_cfg, x, y, seed, test, checkpoint, meta, on_epoch=None, background=0.0,
                     tta=False, store=None):
    """Retrain a config from scratch on (x, y), evaluate the test set (x, y) once (with shift TTA when `tta`),
    save the checkpoint.

    A checkpoint already at `checkpoint` from the same network, recipe, seed and training images (their number,
    and the fingerprint of the training files in `meta`: an earlier, interrupted run of the same command) is
    evaluated instead of trained again. Each epoch's state is kept beside `checkpoint` (and in the shared artifact
    store `store`, where another worker that takes the training over finds it) until the training ends.
    Returns (model, history, test_accuracy, train_seconds).
    """
    identity = {"model": normalise_config(model_config), "train": train_cfg.to_dict(), "seed": seed,
                "train_images": len(y), "training_data": meta.get("training_data", CANONICAL_FINGERPRINT)}
    earlier = finished_checkpoint(checkpoint, identity, x.device)
    if earlier is not None:
        model, saved = earlier
        test_accuracy = accuracy_on(model, *test, tta=tta, background=background)
        if bool(saved.get("tta")) != tta:  # scored another way this time: the file says how, and what it scored
            save_checkpoint(checkpoint, model, train_cfg, {**saved, "tta": tta, "test_accuracy": test_accuracy})
        return model, saved["history"], test_accuracy, saved["train_seconds"]
    seed_everything(seed)
    model = build_model(model_config).to(x.device)
    started = time.perf_counter()
    # epoch by epoch beside the checkpoint (a dot file: never published with it), so a stop costs an epoch at most
    progress = EpochCheckpoint(Path(checkpoint).with_name(f".{Path(checkpoint).name}.epoch"), identity,
                               Path(checkpoint).name, store=store)
    history = train(model, x, y, train_cfg, seed, on_epoch=on_epoch, background=background, checkpoint=progress)
    train_seconds = time.perf_counter() - started + progress.resumed_seconds
    test_accuracy = accuracy_on(model, *test, tta=tta, background=background)
    meta = {**meta, "seed": seed, "test_accuracy": test_accuracy, "train_seconds": train_seconds,
            "train_images": len(y), "augment": train_cfg.augment, "precision": train_cfg.precision,
            "ema": train_cfg.ema, "tta": tta, "torch": str(torch.__version__), "history": history,
            "threads": torch.get_num_threads()}  # CPU results are bit-identical only at the same thread count
    save_checkpoint(checkpoint, model, train_cfg, meta)
    return model, history, test_accuracy, train_seconds


