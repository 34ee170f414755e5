"""The datasets LayerMerge reads: classes, statistics and default augmentation.

:func:`open_dataset` checks that a dataset exists and reads its class list; its
:class:`Dataset` loads the training and test sources lazily (the IDX ones are
cached across datasets) with the readers of :mod:`layermerge.data.formats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from .formats import (
    ArraySource,
    DataSpec,
    DataSpecError,
    Source,
    _cifar_classes,
    _folder_classes,
    _load_cifar,
    _load_folder,
    _load_idx,
    _missing_message,
    parse_data_spec,
)
from .transforms import Augment

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
            raise DataSpecError(_missing_message(spec, "the directory"))
        classes = info.get("classes") or [str(i) for i in range(10)]
    return Dataset(spec, list(classes), info["mean"], info["std"], info["augment"])
