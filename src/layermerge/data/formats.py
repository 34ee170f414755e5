"""Datasets in their on-disk formats, read as images + labels.

A data spec (:class:`DataSpec`, :func:`parse_data_spec`) names a dataset and
where it lies; the readers here turn one split of it into a source: IDX files
(MNIST, Fashion-MNIST, KMNIST) and CIFAR python batches as in-memory uint8
arrays (:class:`ArraySource`), an ImageFolder tree as a list of files decoded
on demand (:class:`FolderSource`). CIFAR batches are pickles, read by
:class:`RestrictedUnpickler`, which refuses every global a batch does not need.
:func:`write_idx` writes IDX files (for tests and synthetic data).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASET_KINDS = ("fashion-mnist", "mnist", "kmnist", "cifar10", "cifar100", "imagefolder")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that is missing, malformed or does not fit the request."""


class DataSpecError(DataError):
    """A data spec that names no dataset: unknown kind, missing path, or no dataset
    where it points."""


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
        raise DataSpecError(
            f"unknown dataset {text!r}: use one of fashion-mnist[:PATH], mnist:PATH, "
            "kmnist:PATH, cifar10:PATH, cifar100:PATH, imagefolder:PATH"
        )
    if not sep or not path:
        if kind != "fashion-mnist":
            raise DataSpecError(f"dataset {kind!r} needs a path: {kind}:PATH")
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


def check_labels(labels: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Refuse labels outside ``0 .. num_classes - 1``, naming the first one and its
    file (a loss would fail on it in the middle of a run)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}: label {int(labels[i])} of image {i} is outside 0..{num_classes - 1} "
            f"({len(bad)} such label(s)); this dataset has {num_classes} classes: fix or "
            "remove those images"
        )


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
        raise DataSpecError(_missing_message(spec, "the directory"))
    img_stem, lab_stem = _IDX_NAMES[split]
    img_path = _find_idx_file(spec.path, spec.kind, img_stem)
    lab_path = _find_idx_file(spec.path, spec.kind, lab_stem)
    for p, stem in ((img_path, img_stem), (lab_path, lab_stem)):
        if p is None:
            raise DataSpecError(_missing_message(spec, f"{stem}[.gz]"))
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images N x H x W, found {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(
            f"{lab_path}: {labels.shape[0] if labels.ndim else 0} labels for {len(images)} images"
        )
    check_labels(labels, 10, lab_path)
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
    raise DataSpecError(
        f"{spec}: no CIFAR python batches in {spec.path} (expected {sub}/ with "
        + ("data_batch_1..5 and test_batch" if spec.kind == "cifar10" else "train and test")
        + ")"
    )


def _read_cifar_batch(
    path: Path, label_key: str, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
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
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: '{label_key}' must be a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {labels.size} labels for {len(data)} images")
    check_labels(labels, num_classes, path)
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
    n = 10 if spec.kind == "cifar10" else 100
    parts = [_read_cifar_batch(f, key, n) for f in files]
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
        raise DataSpecError(f"{spec}: directory {spec.path} does not exist")
    raise DataSpecError(
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
