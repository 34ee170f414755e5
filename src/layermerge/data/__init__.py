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
reproducible from a seed; each option's importance is its network's holdout-val
score after a short fine-tune on holdout-train) and the test split (final
evaluation).

Batches are made here rather than by per-sample ``torchvision`` transforms so
that every random choice (order, crops, flips) comes from a generator seeded
by ``(seed, epoch, batch)``: a run resumed from a checkpoint, or a rank of a
distributed run, sees exactly the batches it would have seen otherwise.

The package, each module importing only from those above it::

    formats     specs, errors, IDX / CIFAR / ImageFolder readers -> sources
    transforms  Augment, Transform: images -> normalised model inputs
    datasets    the known datasets (classes, statistics), open_dataset
    splits      Split and its batches, holdout_indices, DataSplits, make_splits

Everything is importable from ``layermerge.data`` itself.
"""

from .datasets import Dataset, open_dataset
from .formats import (
    DATASET_KINDS,
    DEFAULT_FASHION_MNIST,
    IMAGE_EXTENSIONS,
    ArraySource,
    DataError,
    DataSpec,
    DataSpecError,
    FolderSource,
    RestrictedUnpickler,
    Source,
    UnsafePickleError,
    parse_data_spec,
    read_idx,
    restricted_load,
    write_idx,
)
from .splits import (
    DataSplits,
    Split,
    _mix,  # noqa: F401  (private, but train and diffusion seed from it)
    holdout_indices,
    make_splits,
    make_transform,
)
from .transforms import Augment, Transform

__all__ = [
    "DATASET_KINDS",
    "DEFAULT_FASHION_MNIST",
    "IMAGE_EXTENSIONS",
    "ArraySource",
    "Augment",
    "DataError",
    "DataSpec",
    "DataSpecError",
    "DataSplits",
    "Dataset",
    "FolderSource",
    "RestrictedUnpickler",
    "Source",
    "Split",
    "Transform",
    "UnsafePickleError",
    "holdout_indices",
    "make_splits",
    "make_transform",
    "open_dataset",
    "parse_data_spec",
    "read_idx",
    "restricted_load",
    "write_idx",
]
