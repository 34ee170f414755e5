"""Splits of a dataset, and reproducible batches from them.

:func:`make_splits` returns the four splits the method uses (:class:`DataSplits`):
the full training split, holdout-train and holdout-val (:func:`holdout_indices`)
and the test split. :meth:`Split.batches` draws every random choice (order, crops,
flips) from a generator seeded by ``(seed, epoch, batch)`` (:func:`_mix`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .datasets import Dataset, open_dataset
from .formats import DataError, DataSpec, FolderSource, Source
from .transforms import Augment, Transform


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def batch_count(n: int, batch_size: int, *, train: bool, rank: int = 0, world: int = 1) -> int:
    """Batches one rank of ``world`` gets from ``n`` items: training shares them out
    evenly (ceil) and folds a last batch of one item into the one before it (a
    BatchNorm cannot train on a single item); evaluation takes every ``world``-th."""
    per_rank = math.ceil(n / world) if train else len(range(rank, n, world))
    full, rest = divmod(per_rank, batch_size)
    if train and rest == 1 and full > 0:
        rest = 0
    return full + (1 if rest else 0)


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
        return batch_count(len(self), batch_size, train=train, rank=rank, world=world)

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
        for batch in loader:
            if isinstance(batch, DataError):  # raised in a worker: passed on as a value
                raise batch
            x, y = batch
            yield self.transform.normalise(x), y


class _FolderItems(torch.utils.data.Dataset):
    def __init__(self, source: FolderSource, transform: Transform, train: bool) -> None:
        self.source, self.transform, self.train = source, transform, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        i, seed = item
        try:
            image = self.transform.file(self.source.files[i], self.train, seed)
        except DataError as e:
            # returned, not raised: a worker process would wrap it in its traceback
            return e
        return image, int(self.source.labels[i])


def _collate(batch):
    errors = [b for b in batch if isinstance(b, DataError)]
    if errors:
        return errors[0]
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
