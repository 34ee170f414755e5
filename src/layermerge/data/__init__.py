"""Image classification data already on disk, split the way LayerMerge needs it.

A data spec names a dataset in its usual on-disk format::

    fashion-mnist            /usr/share/datasets/fashion-mnist (Debian: dataset-fashion-mnist)
    fashion-mnist:PATH       IDX files (train-images-idx3-ubyte[.gz], ...)
    mnist:PATH, kmnist:PATH  the same IDX layout
    cifar10:PATH             the python batches (cifar-10-batches-py/data_batch_1, ...)
    cifar100:PATH            the python batches (cifar-100-python/train, test, meta)
    imagefolder:PATH         PATH/train/CLASS/*.jpg and PATH/val/CLASS/*.jpg (ImageNet layout)

Nothing is downloaded. :func:`make_splits` returns the four splits the method
uses: the full training split (fine-tuning), holdout-train and holdout-val
(``N`` images per class each, drawn from the training split, disjoint and
reproducible from a seed; importance is measured on them, DESIGN §6) and the
test split (final evaluation).

Batches are made here rather than by per-sample ``torchvision`` transforms so
that every random choice (order, crops, flips) comes from a generator seeded
by ``(seed, epoch, batch)``: a run resumed from a checkpoint, or a rank of a
distributed run, sees exactly the batches it would have seen otherwise.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import pickle
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASET_KINDS = ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that is missing, malformed or does not fit the request."""


class UnsafePickleError(DataError):
    """A pickle asked for something a CIFAR batch never contains."""


# ---------------------------------------------------------------------------
# specs


@dataclass(frozen=True)
class DataSpec:
    kind: str
    path: Path

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_data_spec(text: str | DataSpec) -> DataSpec:
    """``KIND[:PATH]`` -> :class:`DataSpec` (only Fashion-MNIST has a default path)."""
    if isinstance(text, DataSpec):
        return text
    kind, sep, path = text.partition(":")
    kind = kind.strip().lower().replace("_", "-")
    aliases = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}
    kind = aliases.get(kind, kind)
    if kind not in DATASET_KINDS:
        raise DataError(
            f"unknown dataset {text!r}: use one of fashion-mnist[:PATH], mnist:PATH, "
            "kmnist:PATH, cifar10:PATH, cifar100:PATH, imagefolder:PATH"
        )
    if not sep or not path:
        if kind != "fashion-mnist":
            raise DataError(f"dataset {kind!r} needs a path: {kind}:PATH")
        return DataSpec(kind, DEFAULT_FASHION_MNIST)
    return DataSpec(kind, Path(path).expanduser())


# ---------------------------------------------------------------------------
# sources: one split of a dataset, as images + labels


@dataclass
class ArraySource:
    """Images held in memory as uint8 ``(N, C, H, W)``."""

    images: torch.Tensor
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])


@dataclass
class FolderSource:
    """Image files decoded on demand (ImageFolder layout)."""

    files: list[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return 3


Source = ArraySource | FolderSource


# ---------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX header says {dims} ({expected} bytes of data), the file has "
            f"{len(raw) - header} bytes; the file is truncated or not IDX"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TORCHVISION_DIRS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "kmnist": "KMNIST"}


def _find_idx_file(root: Path, kind: str, stem: str) -> Path | None:
    dirs = [root, root / "raw", root / _IDX_TORCHVISION_DIRS[kind] / "raw"]
    # The original MNIST site names files like "train-images.idx3-ubyte" on some mirrors.
    stems = [stem, stem.replace("-idx", ".idx")]
    for d in dirs:
        for s in stems:
            for suffix in ("", ".gz"):
                p = d / (s + suffix)
                if p.is_file():
                    return p
    return None


def _missing_message(spec: DataSpec, what: str) -> str:
    if spec.kind == "fashion-mnist" and spec.path == DEFAULT_FASHION_MNIST:
        return (
            f"Fashion-MNIST not found at {spec.path} ({what} missing): install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass "
            "fashion-mnist:PATH to a directory with the IDX files"
        )
    return f"{spec}: {what} not found in {spec.path}"


def _load_idx(spec: DataSpec, split: str) -> ArraySource:
    if not spec.path.is_dir():
        raise DataError(_missing_message(spec, "the directory"))
    img_stem, lab_stem = _IDX_NAMES[split]
    img_path = _find_idx_file(spec.path, spec.kind, img_stem)
    lab_path = _find_idx_file(spec.path, spec.kind, lab_stem)
    for p, stem in ((img_path, img_stem), (lab_path, lab_stem)):
        if p is None:
            raise DataError(_missing_message(spec, f"{stem}[.gz]"))
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images N x H x W, found {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{lab_path}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} images"
        )
    return ArraySource(torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64))


# ---------------------------------------------------------------------------
# CIFAR python batches


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    A CIFAR batch is a dict of bytes, lists of ints and one uint8 array; the
    only globals its pickle refers to rebuild that array. Any other global
    (``os.system``, ``builtins.eval``, ...) is how a malicious pickle runs code,
    so it is refused before it is looked up.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles spell bytes
    }

    def __init__(self, file, *, source: str = "pickle") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle the global {module}.{name}; a CIFAR "
                "batch only holds arrays, lists and strings, so this file is not one (or has "
                "been tampered with)"
            )
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def restricted_load(path: str | Path):
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, source=str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise DataError(
                f"{path}: not a readable CIFAR batch ({type(e).__name__}: {e})"
            ) from None


def _str_keys(d, path: Path) -> dict:
    if not isinstance(d, dict):
        raise DataError(f"{path}: a CIFAR batch is a dict, found {type(d).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_dir(spec: DataSpec) -> Path:
    sub = "cifar-10-batches-py" if spec.kind == "cifar10" else "cifar-100-python"
    for d in (spec.path / sub, spec.path):
        if d.is_dir() and any(
            (d / f).is_file() for f in ("data_batch_1", "test_batch", "train", "test")
        ):
            return d
    raise DataError(
        f"{spec}: no CIFAR python batches in {spec.path} (expected {sub}/ with "
        + ("data_batch_1..5 and test_batch" if spec.kind == "cifar10" else "train and test")
        + ")"
    )


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"CIFAR batch {path} does not exist")
    d = _str_keys(restricted_load(path), path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path}: a CIFAR batch needs 'data' and '{label_key}' entries")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array N x 3072")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    labels = np.asarray(d[label_key], dtype=np.int64)
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(spec: DataSpec, split: str) -> ArraySource:
    d = _cifar_dir(spec)
    if spec.kind == "cifar10":
        files = (
            [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
        )
        key = "labels"
    else:
        files, key = [d / ("train" if split == "train" else "test")], "fine_labels"
    parts = [_read_cifar_batch(f, key) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ArraySource(torch.from_numpy(images), labels)


def _cifar_classes(spec: DataSpec) -> list[str] | None:
    d = _cifar_dir(spec)
    meta, key = (
        (d / "batches.meta", "label_names")
        if spec.kind == "cifar10"
        else (d / "meta", "fine_label_names")
    )
    if not meta.is_file():
        return None
    names = _str_keys(restricted_load(meta), meta).get(key)
    if not isinstance(names, list):
        return None
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


# ---------------------------------------------------------------------------
# ImageFolder


def _folder_root(spec: DataSpec, split: str) -> Path:
    names = ("train",) if split == "train" else ("val", "test")
    for n in names:
        if (spec.path / n).is_dir():
            return spec.path / n
    if not spec.path.is_dir():
        raise DataError(f"{spec}: directory {spec.path} does not exist")
    raise DataError(
        f"{spec}: expected {spec.path}/{names[0]}/CLASS/IMAGE files"
        + (" (and val/ or test/ for evaluation)" if split == "train" else "")
        + f"; found no {' or '.join(names)} directory"
    )


def _folder_classes(spec: DataSpec) -> list[str]:
    root = _folder_root(spec, "train")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{root}: no class directories")
    return classes


def _load_folder(spec: DataSpec, split: str) -> FolderSource:
    root = _folder_root(spec, split)
    classes = _folder_classes(spec)
    files, labels = [], []
    for c, name in enumerate(classes):
        d = root / name
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                files.append(p)
                labels.append(c)
    extra = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(f"{root}: classes {extra[:5]} are not in the training split")
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return FolderSource(files, np.asarray(labels, dtype=np.int64))


# ---------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random shifts by up to ``pad`` pixels, horizontal flips,
    or (folders) random-resized crops."""

    pad: int = 0
    flip: bool = False
    resized_crop: bool = False


_INFO: dict[str, dict] = {
    "fashion-mnist": {
        "mean": (0.2860,),
        "std": (0.3530,),
        "augment": Augment(pad=2, flip=True),
        "classes": [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ],
    },
    # Digits and characters are not mirror-symmetric: shifts only.
    "mnist": {"mean": (0.1307,), "std": (0.3081,), "augment": Augment(pad=2)},
    "kmnist": {
        "mean": (0.1918,),
        "std": (0.3483,),
        "augment": Augment(pad=2),
        "classes": ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"],
    },
    "cifar10": {
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        "augment": Augment(pad=4, flip=True),
    },
    "cifar100": {
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
        "augment": Augment(pad=4, flip=True),
    },
    "imagefolder": {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "augment": Augment(flip=True, resized_crop=True),
    },
}


@dataclass
class Dataset:
    """A dataset on disk: its training and test splits, classes and statistics."""

    spec: DataSpec
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment
    _sources: dict[str, Source] = field(default_factory=dict, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def source(self, split: str) -> Source:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split not in self._sources:
            self._sources[split] = _load_source(self.spec, split)
        return self._sources[split]


def _load_source(spec: DataSpec, split: str) -> Source:
    if spec.kind in ("fashion-mnist", "mnist", "kmnist"):
        return _load_idx_cached(spec, split)
    if spec.kind in ("cifar10", "cifar100"):
        return _load_cifar(spec, split)
    return _load_folder(spec, split)


@lru_cache(maxsize=4)
def _load_idx_cached(spec: DataSpec, split: str) -> ArraySource:
    return _load_idx(spec, split)


def open_dataset(spec: str | DataSpec) -> Dataset:
    """Check that the dataset exists and read its class list (images load lazily)."""
    spec = parse_data_spec(spec)
    info = _INFO[spec.kind]
    if spec.kind in ("cifar10", "cifar100"):
        classes = _cifar_classes(spec)
        if classes is None:
            n = 10 if spec.kind == "cifar10" else 100
            classes = [str(i) for i in range(n)]
    elif spec.kind == "imagefolder":
        classes = _folder_classes(spec)
    else:
        if not spec.path.is_dir():
            raise DataError(_missing_message(spec, "the directory"))
        classes = info.get("classes") or [str(i) for i in range(10)]
    return Dataset(spec, list(classes), info["mean"], info["std"], info["augment"])


# ---------------------------------------------------------------------------
# transforms


@dataclass(frozen=True)
class Transform:
    """Dataset images -> the model's input: channels, size, normalisation.

    Grayscale images are repeated to 3 channels for a 3-channel model (and colour
    images converted to luminance for a 1-channel one). In-memory images are
    zero-padded to the model's size when it is at most 25% larger (28 -> 32, the
    usual way to feed MNIST-like data to CIFAR networks), resized otherwise.
    Folder images are resized and centre-cropped (evaluation) or randomly
    resized-cropped (training) to the model's size.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment

    def _stats(self, source_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if len(mean) == 1 and self.channels > 1:
            mean, std = mean.repeat(self.channels), std.repeat(self.channels)
        elif len(mean) == 3 and self.channels == 1:
            w = torch.tensor(_LUMA)
            mean, std = (w * mean).sum(0, keepdim=True), (w * std).sum(0, keepdim=True)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(-1, self.channels, -1, -1)
        if c == 3 and self.channels == 1:
            return (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        raise DataError(f"cannot feed {c}-channel images to a {self.channels}-channel model")

    def _size(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        H, W = self.height, self.width
        if (h, w) == (H, W):
            return x
        if H >= h and W >= w and H <= 1.25 * h and W <= 1.25 * w:
            top, left = (H - h) // 2, (W - w) // 2
            return F.pad(x, [left, W - w - left, top, H - h - top])
        return F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)

    def batch(self, images: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``(B, C, h, w)`` -> normalised float ``(B, channels, height, width)``."""
        x = images.float().div_(255.0)
        x = self._size(self._channels(x))
        if train:
            x = self._random_shift_flip(x, generator)
        mean, std = self._stats(images.shape[1])
        return (x - mean) / std

    def _random_shift_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        a, B = self.augment, x.shape[0]
        if a.pad:
            p = a.pad
            padded = F.pad(x, [p, p, p, p])
            off = torch.randint(0, 2 * p + 1, (B, 2), generator=g)
            H, W = x.shape[-2:]
            x = torch.stack(
                [padded[i, :, oy : oy + H, ox : ox + W] for i, (oy, ox) in enumerate(off.tolist())]
            )
        if a.flip:
            flip = torch.rand(B, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def file(self, path: Path, train: bool, seed: int) -> torch.Tensor:
        """One image file -> uint8 ``(C, height, width)`` (before normalisation)."""
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            rng = random.Random(seed)
            if train and self.augment.resized_crop:
                im = _random_resized_crop(im, self.height, self.width, rng)
            else:
                im = _resize_center_crop(im, self.height, self.width)
            if train and self.augment.flip and rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x.shape[1])
        return (x.float().div_(255.0) - mean) / std


_LUMA = (0.299, 0.587, 0.114)


def _resize_center_crop(im, H: int, W: int):
    from PIL import Image

    # The usual evaluation transform: resize the short side to size / 0.875, crop the centre.
    w, h = im.size
    scale = max(H, W) / 0.875 / min(w, h)
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - W) // 2, (nh - H) // 2
    return im.crop((left, top, left + W, top + H))


def _random_resized_crop(im, H: int, W: int, rng: random.Random):
    from PIL import Image

    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return im.resize(
                (W, H), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
            )
    return _resize_center_crop(im, H, W)


# ---------------------------------------------------------------------------
# splits and batches


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class Split:
    """A subset of one source, with the transform that feeds it to the model."""

    name: str
    source: Source
    indices: np.ndarray
    transform: Transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.source.labels[self.indices]

    def num_batches(self, batch_size: int, *, train: bool, rank: int = 0, world: int = 1) -> int:
        """How many batches :meth:`batches` yields with these arguments."""
        n = math.ceil(len(self) / world) if train else len(range(rank, len(self), world))
        full, rest = divmod(n, batch_size)
        if train and rest == 1 and full > 0:
            rest = 0
        return full + (1 if rest else 0)

    def batches(
        self,
        batch_size: int,
        *,
        train: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        augment: bool | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``(inputs, labels)`` for one rank of ``world``.

        ``train``: shuffled (order from ``seed`` and ``epoch``) and augmented
        (unless ``augment`` is false).
        Training order comes from :class:`torch.utils.data.DistributedSampler`:
        every rank gets ``ceil(len / world)`` samples, the shortfall filled by
        repeating samples, so all ranks run the same number of steps. A last
        training batch of one sample is dropped (BatchNorm cannot normalise it).
        Evaluation (``train=False``) is in order, every sample on exactly one rank.
        """
        from torch.utils.data.distributed import DistributedSampler

        if train:
            sampler = DistributedSampler(
                range(len(self)), num_replicas=world, rank=rank, shuffle=True, seed=seed
            )
            sampler.set_epoch(epoch)
            order = np.asarray(list(sampler), dtype=np.int64)
        else:
            # Evaluation sums over ranks, so every sample is seen exactly once.
            order = np.arange(rank, len(self), world, dtype=np.int64)
        augment = train if augment is None else augment
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if train and chunks and len(chunks[-1]) < 2 and len(chunks) > 1:
            chunks.pop()
        if isinstance(self.source, FolderSource):
            yield from self._folder_batches(chunks, augment, seed, epoch, workers)
            return
        for b, chunk in enumerate(chunks):
            idx = torch.from_numpy(self.indices[chunk])
            g = torch.Generator().manual_seed(_mix(seed, epoch, rank, b))
            x = self.transform.batch(self.source.images[idx], augment, g)
            yield x, torch.from_numpy(self.source.labels[idx.numpy()])

    def _folder_batches(self, chunks, augment: bool, seed: int, epoch: int, workers: int):
        from torch.utils.data import DataLoader

        items = [
            [(int(self.indices[i]), _mix(seed, epoch, int(self.indices[i]))) for i in chunk]
            for chunk in chunks
        ]
        loader = DataLoader(
            _FolderItems(self.source, self.transform, augment),
            batch_sampler=items,
            num_workers=workers,
            collate_fn=_collate,
        )
        for x, y in loader:
            yield self.transform.normalise(x), y


class _FolderItems(torch.utils.data.Dataset):
    def __init__(self, source: FolderSource, transform: Transform, train: bool) -> None:
        self.source, self.transform, self.train = source, transform, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        return self.transform.file(self.source.files[i], self.train, seed), int(
            self.source.labels[i]
        )


def _collate(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])


def holdout_indices(
    labels: np.ndarray, per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint holdout-train and holdout-val indices, ``per_class`` of each class each.

    For every class (in label order) its indices are shuffled by one generator
    seeded with ``seed``; the first ``per_class`` go to holdout-train, the next
    ``per_class`` to holdout-val. Both are returned sorted.
    """
    if per_class < 1:
        raise DataError(f"the holdout size must be at least 1 image per class, got {per_class}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2 * per_class:
            raise DataError(
                f"class {c} has {len(idx)} training images, fewer than the {2 * per_class} "
                f"needed for holdout-train and holdout-val of {per_class} per class; lower "
                "the holdout size"
            )
        idx = rng.permutation(idx)
        train.append(idx[:per_class])
        val.append(idx[per_class : 2 * per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class DataSplits:
    """The splits of one dataset for one model input shape.

    The holdout splits are drawn on first use, so training on a dataset too small
    for them (e.g. a few images per class) still works.
    """

    dataset: Dataset
    input_shape: tuple[int, int, int]
    transform: Transform
    holdout_per_class: int = 50
    seed: int = 0
    _cache: dict[str, Split] = field(default_factory=dict, repr=False)

    def _split(self, name: str) -> Split:
        if name not in self._cache:
            split = "test" if name == "test" else "train"
            src = self.dataset.source(split)
            if name in ("train", "test"):
                self._cache[name] = Split(name, src, np.arange(len(src)), self.transform)
            else:
                tr, va = holdout_indices(src.labels, self.holdout_per_class, self.seed)
                self._cache["holdout-train"] = Split("holdout-train", src, tr, self.transform)
                self._cache["holdout-val"] = Split("holdout-val", src, va, self.transform)
        return self._cache[name]

    @property
    def train(self) -> Split:
        """The whole training split (fine-tuning)."""
        return self._split("train")

    @property
    def holdout_train(self) -> Split:
        return self._split("holdout-train")

    @property
    def holdout_val(self) -> Split:
        return self._split("holdout-val")

    @property
    def test(self) -> Split:
        return self._split("test")

    def split(self, name: str) -> Split:
        """A split by name: train, holdout-train, holdout-val or test."""
        if name not in ("train", "holdout-train", "holdout-val", "test"):
            raise ValueError(f"no split {name!r}")
        return self._split(name)

    def describe(self) -> dict:
        """What the splits are, for table metadata."""
        return {
            "data": str(self.dataset.spec),
            "num_classes": self.dataset.num_classes,
            "holdout_per_class": self.holdout_per_class,
            "split_seed": self.seed,
            "holdout_train_size": len(self.holdout_train),
            "holdout_val_size": len(self.holdout_val),
            "train_size": len(self.train),
        }


def make_transform(
    dataset: Dataset,
    input_shape: tuple[int, ...],
    *,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: Augment | None = None,
) -> Transform:
    """``normalization`` (mean, std) and ``augment`` replace the dataset's own."""
    if len(input_shape) != 3:
        raise DataError(f"input shape must be C,H,W, got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if c not in (1, 3):
        raise DataError(f"image data feeds 1- or 3-channel models, this model wants {c} channels")
    mean, std = normalization if normalization is not None else (dataset.mean, dataset.std)
    if len(mean) != len(std) or len(mean) not in (1, 3) or min(std) <= 0:
        raise DataError(f"normalization needs 1 or 3 means and positive stds, got {mean}, {std}")
    aug = dataset.augment if augment is None else augment
    return Transform(c, h, w, tuple(mean), tuple(std), aug)


def make_splits(
    spec: str | DataSpec | Dataset,
    input_shape: tuple[int, ...],
    *,
    holdout_per_class: int = 50,
    seed: int = 0,
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    augment: Augment | None = None,
) -> DataSplits:
    """Training, holdout-train, holdout-val and test splits of a dataset for a model
    taking ``input_shape`` (C, H, W) inputs.

    Smaller in-memory images are zero-padded to the model's size (28 -> 32, see
    :class:`Transform`). ``normalization`` = (mean, std) replaces the dataset's
    statistics (``((0.5,), (0.5,))`` scales images to [-1, 1]; padding is then -1),
    ``augment`` its training augmentation (e.g. ``Augment(flip=True)``: flips, no
    shifts)."""
    dataset = spec if isinstance(spec, Dataset) else open_dataset(spec)
    if holdout_per_class < 1:
        raise DataError(
            f"the holdout size must be at least 1 image per class, got {holdout_per_class}"
        )
    return DataSplits(
        dataset=dataset,
        input_shape=tuple(int(v) for v in input_shape),
        transform=make_transform(
            dataset, input_shape, normalization=normalization, augment=augment
        ),
        holdout_per_class=holdout_per_class,
        seed=seed,
    )


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in ``.gz``."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.tobytes()
    if path.suffix == ".gz":
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
            f.write(data)
        data = buf.getvalue()
    path.write_bytes(data)
    return path
