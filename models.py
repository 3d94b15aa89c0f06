"""Explicit CNN skeletons built from a plain, JSON-serialisable config, and their cost helpers (size, MACs, latency).

A config is a dict:
    {"conv": [{"channels": 32, "kernel": 3, "slope": 0.01, "batch_norm": true, "pool": false}, ...],
     "fc": [128], "dropout": 0.25, "num_classes": 10}
Every conv block is conv -> BatchNorm (optional) -> LeakyReLU(slope) -> MaxPool(2) (optional).
Dropout sits only in the fully connected head, where no BatchNorm follows it: a Dropout output fed
into a BatchNorm shifts the variance the BatchNorm learned between training and inference.
"""
import copy
import math
import statistics
import time

import torch
from torch import nn

from errors import UserError

INPUT_SHAPE = (1, 28, 28)
CONV_KEYS = {"channels", "kernel", "slope", "batch_norm", "pool"}


class ConfigError(UserError, ValueError):
    """A model config that cannot be built; the message says which key and what is allowed."""


def normalise_config(config):
    """A checked deep copy of a model config with defaults filled in."""
    if not isinstance(config, dict):
        raise ConfigError("a model config must be a JSON object with keys 'conv', 'fc' and 'dropout'")
    missing = {"conv", "fc"} - config.keys()
    if missing:
        raise ConfigError(f"model config misses {', '.join(sorted(missing))}")
    config = copy.deepcopy(config)
    config.setdefault("dropout", 0.0)
    config.setdefault("num_classes", 10)
    if not isinstance(config["conv"], list) or not config["conv"]:
        raise ConfigError("model config 'conv' must be a non-empty list of conv blocks")
    for i, block in enumerate(config["conv"]):
        if isinstance(block, list):
            raise ConfigError(f"conv block {i} is a list; each block is one JSON object (on the command line one "
                              "argument per block: --conv-blocks '{\"channels\": 16, \"kernel\": 3}' '{...}')")
        if not isinstance(block, dict) or not {"channels", "kernel"} <= block.keys():
            raise ConfigError(f"conv block {i} needs at least 'channels' and 'kernel'")
        block.setdefault("slope", 0.01)
        block.setdefault("batch_norm", True)
        block.setdefault("pool", False)
        unknown = block.keys() - CONV_KEYS
        if unknown:
            raise ConfigError(f"conv block {i} has unknown keys {sorted(unknown)}; allowed: {sorted(CONV_KEYS)}")
        if not (isinstance(block["channels"], int) and block["channels"] >= 1):
            raise ConfigError(f"conv block {i}: channels must be a positive integer")
        if not (isinstance(block["kernel"], int) and block["kernel"] >= 1 and block["kernel"] % 2 == 1):
            raise ConfigError(f"conv block {i}: kernel must be a positive odd integer")
        if not (_is_number(block["slope"]) and 0.0 <= block["slope"] < 1.0):  # NaN fails this too
            raise ConfigError(f"conv block {i}: slope (of the leaky ReLU) must be a number in [0, 1), "
                              f"not {block['slope']}")
        if not (isinstance(block["batch_norm"], bool) and isinstance(block["pool"], bool)):
            raise ConfigError(f"conv block {i}: batch_norm and pool must be true or false")
    if not isinstance(config["fc"], list) or not all(isinstance(w, int) and w >= 1 for w in config["fc"]):
        raise ConfigError("model config 'fc' must be a list of positive integers (may be empty)")
    if not (_is_number(config["dropout"]) and 0.0 <= config["dropout"] < 1.0):
        raise ConfigError(f"model config 'dropout' must be a number in [0, 1), not {config['dropout']}")
    return config


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def dropout_feeds_batchnorm(modules):
    """True when a BatchNorm comes anywhere after a Dropout in this module order."""
    seen_dropout = False
    for module in modules:
        if isinstance(module, DROPOUTS):
            seen_dropout = True
        elif isinstance(module, BATCH_NORMS) and seen_dropout:
            return True
    return False


class ConvNet(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = normalise_config(config)
        channels, side = INPUT_SHAPE[0], INPUT_SHAPE[1]
        features = []
        for block in self.config["conv"]:
            features.append(nn.Conv2d(channels, block["channels"], block["kernel"], padding=block["kernel"] // 2,
                                      bias=not block["batch_norm"]))
            if block["batch_norm"]:
                features.append(nn.BatchNorm2d(block["channels"]))
            features.append(nn.LeakyReLU(block["slope"]))
            if block["pool"]:
                if side < 2:
                    raise ConfigError("too many pooling layers: the feature map is already 1x1")
                features.append(nn.MaxPool2d(2))
                side //= 2
            channels = block["channels"]
        self.features = nn.Sequential(*features)
        head = [nn.Flatten()]
        width = channels * side * side
        for fc_width in self.config["fc"]:
            head += self._dropout() + [nn.Linear(width, fc_width), nn.LeakyReLU(self.config["conv"][-1]["slope"])]
            width = fc_width
        head += self._dropout() + [nn.Linear(width, self.config["num_classes"])]
        self.classifier = nn.Sequential(*head)
        if dropout_feeds_batchnorm(self.modules()):
            raise ConfigError("this config would feed a Dropout output into a BatchNorm")

    def _dropout(self):
        return [nn.Dropout(self.config["dropout"])] if self.config["dropout"] > 0 else []

    def forward(self, x):
        return self.classifier(self.features(x))


def build_model(config):
    """The network of `config`, in channels_last memory order to match the data (faster convolutions)."""
    return ConvNet(config).to(memory_format=torch.channels_last)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


def count_macs(model):
    """Multiply-accumulates of one forward pass for one image (conv and linear layers)."""
    total = 0

    def conv_hook(module, inputs, output):
        nonlocal total
        kernel_macs = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * kernel_macs

    def linear_hook(module, inputs, output):
        nonlocal total
        total += module.in_features * module.out_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, *INPUT_SHAPE, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def mmac(config):
    """Million multiply-accumulates per image of the network of `config` (built on the CPU, in milliseconds)."""
    return count_macs(build_model(config)) / 1e6


def describe(config):
    """A short human name of a network, e.g. 'conv 32-64p k3-3 + FC 128' (p: a 2x2 max-pool follows)."""
    conv = config["conv"]
    channels = "-".join(f"{b['channels']}{'p' if b.get('pool') else ''}" for b in conv)
    kernels = "-".join(str(b["kernel"]) for b in conv)
    head = "-".join(str(w) for w in config["fc"]) or "none"
    return f"conv {channels} k{kernels} + FC {head}"


def cpu_latency_ms(model, batch=64, repeats=5):
    """Median CPU inference time per image in milliseconds (a copy of the model in eval mode, batches of
    `batch`, after a warm-up). Measured, so it moves with whatever else the machine runs at the time."""
    model = copy.deepcopy(model).to("cpu").eval()
    images = torch.zeros(batch, *INPUT_SHAPE).to(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        model(images)
        for _ in range(repeats):
            started = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / batch
