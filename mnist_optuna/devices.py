"""Where the arithmetic runs: the device (CUDA, MPS or the CPU, deterministic kernels unless asked otherwise), and
the precision (bf16 autocast where the device computes bf16 natively, else fp32)."""
import os
from pathlib import Path

import torch

from errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


PRECISIONS = ("auto", "fp32", "bf16")


# CPU flags of native bf16 arithmetic (Zen 4, Sapphire Rapids and later); without them bf16 is emulated, slower than fp32
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def resolve_device(name, deterministic=True):
    """torch.device for auto|cpu|cuda|mps, with deterministic kernels unless the user opts out."""
    if name not in DEVICES:
        raise UserError(f"--device {name!r} is unknown; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("--device mps asked for, but MPS is not available; use --device cpu or auto")
    if name == "cuda":
        # cuBLAS needs this set before its first use to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return torch.device(name)


def cpu_flags():
    """The CPU's feature flags as Linux reports them (an empty set elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device):
    """(True/False, why): whether `device` computes bf16 natively, so that bf16 autocast is faster than fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return False, f"{torch.cuda.get_device_name(device)} has no native bf16"
    if device.type == "cpu":
        found = sorted(set(BF16_CPU_FLAGS) & cpu_flags())
        if found:
            return True, f"the CPU has {' and '.join(found)}"
        return False, f"the CPU lacks {' and '.join(BF16_CPU_FLAGS)}, so bf16 would be emulated and slower"
    return False, f"bf16 autocast is not used on {device.type}"


def resolve_precision(name, device):
    """(fp32 | bf16, why) for --precision auto | fp32 | bf16 on `device`."""
    if name not in PRECISIONS:
        raise UserError(f"--precision {name!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    native, why = native_bf16(device)
    if name == "auto":
        return ("bf16" if native else "fp32"), f"auto: {why}"
    if name == "bf16" and device.type == "mps":
        raise UserError("--precision bf16 is not supported on mps; use --precision fp32 or auto")
    return name, "asked for" + ("" if name == "fp32" or native else f" ({why})")


def describe_device(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type
