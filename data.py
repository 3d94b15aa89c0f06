"""MNIST on the device: read once, validate, normalise once, split with a seed, batch by slicing."""
import hashlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from errors import UserError, first_line

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# sha256 of the canonical MNIST files; anything else is a user's own MNIST-format data set.
CANONICAL_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}
IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049


def fingerprint_of(image_digest, label_digest):
    """What a training set is, in 16 hex digits: from the sha256 of its image and label files."""
    return hashlib.sha256(f"{image_digest}:{label_digest}".encode()).hexdigest()[:16]


# the training files of canonical MNIST; what every record made before fingerprints were kept was searched on
CANONICAL_FINGERPRINT = fingerprint_of(*(CANONICAL_SHA256[name] for name in FILES["train"]))
IMAGE_SIDE = 28
NUM_CLASSES = 10
MIN_SPLIT = 10 * NUM_CLASSES  # validation and training images at least: ten of each class
EVAL_BATCH = 250  # the fastest evaluation batch measured on 2 CPU cores (benchmarks/throughput.py)


class DataError(UserError):
    """Data that cannot be used; the message is one line that says what to do."""


DEFAULT_DATA_DIR = Path("data")


def resolve_data_dir(flag_value):
    """--data-dir, else $MNIST_DATA_DIR, else ./data (the torchvision root that holds MNIST/raw/)."""
    return Path(flag_value or os.environ.get("MNIST_DATA_DIR") or DEFAULT_DATA_DIR)


def raw_folder(data_dir):
    return Path(data_dir) / "MNIST" / "raw"


def _download(data_dir):
    import torchvision  # only needed here; the hot path never touches torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        for train in (True, False):
            torchvision.datasets.MNIST(str(data_dir), train=train, download=True)
    finally:
        socket.setdefaulttimeout(previous)


_CHECKED = set()  # (folder, sizes and mtimes) already validated in this process
_DIGESTS = {}     # sha256 of each file validated in this process, by path


def ensure_files(data_dir):
    """Make sure the four IDX files exist (downloading when the network allows) and are sound.

    The checks (and the warning for non-canonical files) run once per process for unchanged files,
    so reading the test set after the search does not hash everything again.
    """
    raw = raw_folder(data_dir)
    names = [name for pair in FILES.values() for name in pair]
    if all((raw / name).is_file() for name in names):
        stamp = (str(raw.resolve()), tuple((raw / n).stat().st_size for n in names),
                 tuple((raw / n).stat().st_mtime_ns for n in names))
        if stamp in _CHECKED:
            return raw
    else:
        stamp = None
    missing = [name for name in names if not (raw / name).is_file()]
    packed = [name for name in missing if (raw / f"{name}.gz").is_file()]
    if packed:  # the files as MNIST's site serves them: only not unpacked yet
        raise DataError(f"MNIST in {raw}/ is still compressed ({', '.join(f'{name}.gz' for name in packed)}); "
                        f"decompress it there: gunzip -k {raw}/*.gz")
    if missing and Path(data_dir) != DEFAULT_DATA_DIR:
        # a folder the user named is read, never filled: a mistyped path must not grow MNIST/raw folders
        raise DataError(f"MNIST not found in {raw}/ (missing {', '.join(missing)}); put the files there, fix "
                        f"--data-dir / MNIST_DATA_DIR, or leave both unset to download MNIST into ./{DEFAULT_DATA_DIR}")
    if missing:
        try:
            _download(data_dir)
        except Exception as error:  # any failure to fetch becomes the same actionable line
            reason = first_line(error)
            raise DataError(
                f"MNIST not found in {raw}/ (expected {', '.join(names)}) and the download failed "
                f"({reason}); put the files there or pass --data-dir / set MNIST_DATA_DIR"
            ) from None
    for images, labels in FILES.values():
        n_images = check_idx(raw / images, IMAGE_MAGIC)
        n_labels = check_idx(raw / labels, LABEL_MAGIC)
        if n_images != n_labels:
            raise DataError(f"{raw / images} holds {n_images} images but {raw / labels} holds {n_labels} labels; "
                            "restore matching files")
        # every file's labels, the test file's included, before any work: not after a whole search
        if n_labels and int(np.fromfile(raw / labels, dtype=np.uint8, offset=8).max()) >= NUM_CLASSES:
            raise DataError(f"{raw / labels} holds labels outside 0..{NUM_CLASSES - 1}; replace the label file")
    for name in names:
        digest = _DIGESTS[str(raw.resolve() / name)] = sha256(raw / name)
        if digest != CANONICAL_SHA256[name]:
            print(f"warning: {raw / name} is not the canonical MNIST file; using it as an MNIST-format data set",
                  file=sys.stderr)
    if stamp is not None:
        _CHECKED.add(stamp)
    return raw


def training_fingerprint(data_dir):
    """The fingerprint of the training files in `data_dir` (fingerprint_of): a study, a promotion score and a
    checkpoint record it, so other data in the same folder is never answered with their old results."""
    raw = ensure_files(data_dir).resolve()
    return fingerprint_of(*(_DIGESTS[str(raw / name)] for name in FILES["train"]))


def check_idx(path, magic):
    """Validate an IDX header against the file size; return the item count."""
    size = path.stat().st_size
    header_len = 16 if magic == IMAGE_MAGIC else 8
    if size < header_len:
        raise DataError(f"{path} is truncated ({size} bytes); replace it with a complete MNIST file")
    header = np.fromfile(path, dtype=">u4", count=header_len // 4)
    if int(header[0]) != magic:
        raise DataError(f"{path} has magic number {int(header[0])}, expected {magic}; it is not an MNIST IDX "
                        "file of this kind, replace it")
    count = int(header[1])
    if magic == IMAGE_MAGIC:
        rows, cols = int(header[2]), int(header[3])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{path} holds {rows}x{cols} images; only 28x28 images are supported")
        expected = header_len + count * rows * cols
    else:
        expected = header_len + count
    if size != expected:
        raise DataError(f"{path} is {size} bytes but its header promises {count} items ({expected} bytes); "
                        "the file is truncated or corrupt, replace it")
    return count


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_split(data_dir, split):
    """uint8 images [N, 28, 28] and int64 labels [N] of 'train' or 'test'.

    ensure_files checks the files first (once per process): headers, sizes and matching counts. The IDX data
    is then read straight into numpy, which spares every run the 1.5 s import of torchvision (it only
    downloads here)."""
    raw = ensure_files(data_dir)
    image_name, label_name = FILES[split]
    images = np.fromfile(raw / image_name, dtype=np.uint8, offset=16).reshape(-1, IMAGE_SIDE, IMAGE_SIDE)
    labels = torch.from_numpy(np.fromfile(raw / label_name, dtype=np.uint8, offset=8).astype(np.int64))
    if labels.numel() and labels.max() >= NUM_CLASSES:
        raise DataError(f"MNIST {split} labels in {raw} fall outside 0..9; replace the label file")
    return torch.from_numpy(images), labels


def stratified_take(labels, size, seed):
    """Indices of `size` items drawn per class in proportion to the class counts, and the rest.

    The same labels and seed always give the same two index sets, sorted, disjoint, covering everything.
    """
    labels = np.asarray(labels)
    if not 0 <= size <= len(labels):
        raise DataError(f"cannot take {size} of {len(labels)} images; choose a size from 0 to {len(labels)}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    quota = np.floor(exact).astype(int)
    # hand the leftover items to the classes with the largest remainders (ties by class order)
    leftover = size - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:leftover]] += 1
    taken = []
    for cls, n in zip(classes, quota):
        members = np.flatnonzero(labels == cls)
        taken.append(rng.permutation(members)[:n])
    taken = np.sort(np.concatenate(taken))
    rest = np.setdiff1d(np.arange(len(labels)), taken, assume_unique=True)
    return taken, rest


@dataclass
class SearchData:
    """Device tensors for a search: normalised images [N, 1, 28, 28] float32 and int64 labels."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: float
    std: float
    train_indices: np.ndarray  # positions in the 60,000 training images, for the record
    val_indices: np.ndarray
    all_x: torch.Tensor        # every training image (train + validation, beyond any subset): the final retrain
    all_y: torch.Tensor
    fingerprint: str = CANONICAL_FINGERPRINT  # of the training files (training_fingerprint)

    @property
    def background(self):
        """The normalised value of a blank (0) pixel."""
        return -self.mean / self.std


def normalise(images, mean, std, device):
    """[N, 1, 28, 28] float32 in channels_last order, which convolutions run faster on (CPU and GPU)."""
    x = images.to(device=device, dtype=torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).unsqueeze(1).contiguous(memory_format=torch.channels_last)


def load_search_data(data_dir, device, val_size, train_subset=None, split_seed=0):
    """The seeded stratified train/validation split, on the device. The test set is not touched."""
    images, labels = read_split(data_dir, "train")
    if val_size < MIN_SPLIT or (train_subset is not None and train_subset < MIN_SPLIT):
        raise DataError(f"--val-size {val_size} and --train-subset {train_subset}: each needs at least {MIN_SPLIT} "
                        "images (a score on fewer tells no networks apart; one image is 0 or 100 %)")
    if val_size >= len(labels):
        raise DataError(f"--val-size {val_size} leaves no training images out of {len(labels)}; "
                        f"choose fewer than {len(labels)}")
    val_idx, train_idx = stratified_take(labels.numpy(), val_size, split_seed)
    if train_subset is not None:
        if train_subset > len(train_idx):
            raise DataError(f"--train-subset {train_subset} is larger than the {len(train_idx)} training images "
                            f"left after validation; choose at most {len(train_idx)}")
        # a second stream so the subset does not depend on how the validation draw consumed the first
        picked, _ = stratified_take(labels.numpy()[train_idx], train_subset, split_seed + 1_000_003)
        train_idx = train_idx[picked]
    mean, std = pixel_statistics(images)
    x = normalise(images, mean, std, device)
    y = labels.to(device)
    t_idx, v_idx = torch.from_numpy(train_idx).to(device), torch.from_numpy(val_idx).to(device)
    return SearchData(x[t_idx], y[t_idx], x[v_idx], y[v_idx], mean, std, train_idx, val_idx, x, y,
                      training_fingerprint(data_dir))


def final_training_set(data, size=None, seed=0):
    """All training images (train + validation, not only the search subset), or a stratified `size` of them,
    for the retrain of the best config."""
    if size is None or size >= len(data.all_y):
        return data.all_x, data.all_y  # no copy of all 60,000
    return _images(data, np.arange(len(data.all_y)), size, seed)


def promotion_training_set(data, size=None, seed=0):
    """Every training image outside the validation split (or a stratified `size` of them): what a promoted
    configuration trains on, like the final model but without the validation images it is scored on."""
    keep = np.ones(len(data.all_y), dtype=bool)
    keep[data.val_indices] = False
    return _images(data, np.flatnonzero(keep), size, seed)


def _images(data, indices, size, seed):
    """The images and labels at `indices` of all 60,000, or a stratified `size` of them."""
    if size is not None and size < len(indices):
        picked, _ = stratified_take(data.all_y.cpu().numpy()[indices], size, seed)
        indices = indices[picked]
    index = torch.from_numpy(indices).to(data.all_y.device)
    return data.all_x[index], data.all_y[index]


def pixel_statistics(images):
    """Mean and std of uint8 images scaled to [0, 1]."""
    pixels = images.float().div_(255.0)
    mean, std = pixels.mean().item(), pixels.std().item()
    if not std > 0:  # normalising would divide by zero
        raise DataError(f"the training images are all one value ({round(255 * mean)}); they hold no digits: "
                        "replace the image file")
    return mean, std


def training_statistics(data_dir):
    """The normalisation every split uses: statistics of the training file only, so the test set never
    shapes the inputs."""
    return pixel_statistics(read_split(data_dir, "train")[0])


def batches(x, y, batch_size, generator=None, drop_last=True):
    """Mini-batches by slicing a seeded permutation (no permutation without a generator)."""
    n = len(y)
    if generator is None:
        order = None
    else:
        order = torch.randperm(n, generator=generator).to(y.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            index = order[start:start + batch_size]
            yield x[index], y[index]


def random_affine(x, generator, background, degrees=10.0, shift=2.0, scale=(0.9, 1.1)):
    """A small random affine per image (rotation, shift in pixels, scale), for a whole batch on its device.

    `generator` lives on x's device and makes the draw reproducible; `background` is the normalised
    value of a blank pixel, so what shifts in from the border is background, not mean grey.
    """
    n, device = len(x), x.device

    def uniform(low, high):
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    angle = uniform(-degrees, degrees) * (torch.pi / 180)
    zoom = uniform(*scale)
    # affine_grid maps output to input coordinates in [-1, 1]; one pixel is 2 / side of that range
    tx, ty = (uniform(-shift, shift) * 2 / x.shape[-1] for _ in range(2))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    moved = torch.nn.functional.grid_sample(x - background, grid, padding_mode="zeros", align_corners=False)
    return (moved + background).contiguous(memory_format=torch.channels_last)
