"""What a validation score can tell apart: a model's scores on the validation images (accuracy with its standard
error, the negative log-likelihood, which images it gets right, packed to a bit each), McNemar's exact test of two
models scored on the same images, and the rule that chooses among candidates within noise of each other. It trains
nothing and never sees the test set."""
import base64
import math

import numpy as np
import torch

# two models whose paired difference has a larger p-value than this are "within noise" of each other
ALPHA = 0.05


def standard_error(accuracy, images):
    """The standard error of an accuracy measured on `images` images, from the finite set alone (binomial): about
    0.1 point near 99 % on 10,000 images. The noise of training comes on top of it."""
    if not images:
        return float("nan")
    return math.sqrt(max(accuracy * (1.0 - accuracy), 0.0) / images)


def scores_of_logits(logits, labels):
    """{"accuracy", "nll", "images", "correct"} of fp32 logits on labelled images: the negative log-likelihood is the
    mean cross-entropy without label smoothing (a continuous score, less noisy than a count of errors), "correct"
    which images the argmax gets right, packed (pack_correct)."""
    logits = logits.float()
    correct = logits.argmax(1) == labels
    nll = torch.nn.functional.cross_entropy(logits, labels).item()
    return {"accuracy": correct.float().mean().item(), "nll": nll, "images": len(labels),
            "correct": pack_correct(correct)}


def pack_correct(correct):
    """A boolean vector of per-image correctness as text: one bit an image (1,250 bytes for 10,000 images), base64."""
    bits = np.packbits(np.asarray(torch.as_tensor(correct).cpu().numpy(), dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_correct(text, images):
    """The boolean vector pack_correct packed, `images` long."""
    bits = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    return np.unpackbits(bits)[:images].astype(bool)


def mcnemar(correct_a, correct_b):
    """McNemar's exact test of two models on the same images: (images only A gets right, images only B gets right,
    two-sided p-value). The p-value is the binomial probability, at one half, of a split at least as uneven as the
    one seen among the images where they disagree; 1 when they never disagree."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"McNemar's test compares models on the same images: {a.shape} against {b.shape}")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    disagree = only_a + only_b
    if not disagree:
        return only_a, only_b, 1.0
    tail = sum(math.comb(disagree, k) for k in range(min(only_a, only_b) + 1))
    return only_a, only_b, min(1.0, 2 * tail / 2 ** disagree)


def score_text(accuracy, images, nll=None):
    """'99.12 ± 0.09 %' (the standard error of the finite validation set), with ', NLL 0.0312' when known."""
    text = f"{100 * accuracy:.2f} ± {100 * standard_error(accuracy, images):.2f} %"
    return text + (f", NLL {nll:.4f}" if nll is not None else "")


def compare(best, other, images):
    """Whether `best` (packed correctness) beats `other` on the same `images` validation images beyond noise:
    {"only_best", "only_other", "p_value", "beyond_noise"} (McNemar's exact test at ALPHA); None when either has no
    recorded correctness."""
    if not (best and other):
        return None
    only_best, only_other, p_value = mcnemar(unpack_correct(best, images), unpack_correct(other, images))
    return {"only_best": only_best, "only_other": only_other, "p_value": p_value,
            "beyond_noise": p_value < ALPHA and only_best > only_other}


def comparison_text(comparison, best_name, other_name):
    """One line: is the best better than the runner-up beyond noise, with the paired counts and the p-value."""
    if comparison is None:
        return f"{best_name} against {other_name}: no per-image record to compare them on"
    verdict = "better beyond noise" if comparison["beyond_noise"] else "within noise of"
    return (f"{best_name} is {verdict}{' than' if comparison['beyond_noise'] else ''} {other_name} "
            f"(McNemar's exact test on the same validation images: {comparison['only_best']} right only by the best, "
            f"{comparison['only_other']} only by the other, p = {comparison['p_value']:.2g})")
