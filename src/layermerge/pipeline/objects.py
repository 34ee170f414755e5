"""A compress run over Python objects: a model (``nn.Module``) and torch datasets.

:class:`TorchSplits` gives the stages the splits they need from the user's own
``Dataset``/``DataLoader`` objects (``(x, y)`` items, the user's own transforms and
normalisation): ``train`` (fine-tuning; importance fine-tunes on a seeded subset of
it, as large as ``val``), ``val`` (importance scores) and ``test`` (the reported
quality; ``val`` when no test set is given). :func:`data_digest` and
:func:`model_digest` name the objects in the run's stage keys, so that other
data or other weights redo the stages that depend on them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from ..data.splits import batch_count
from ..models import load_model
from .config import ConfigError
from .hooks import hooks_for
from .run import Run

#: samples hashed into a dataset's digest (first, last and evenly between)
DIGEST_SAMPLES = 16


def as_dataset(data: Any, name: str) -> Dataset:
    """The map-style dataset of a ``Dataset`` or ``DataLoader`` (a loader's batch size,
    sampler and workers are not used: the config's batch sizes and the run's seeded
    order are)."""
    ds = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__getitem__"):
        raise ConfigError(
            f"{name}: an iterable dataset cannot be split and reshuffled reproducibly; pass a "
            "map-style torch Dataset (with __len__ and __getitem__) or a DataLoader over one"
        )
    try:
        n = len(ds)
    except TypeError:
        raise ConfigError(f"{name}: the dataset has no length; give it a __len__") from None
    if n == 0:
        raise ConfigError(f"{name}: the dataset is empty")
    item = ds[0]
    if not (isinstance(item, tuple | list) and len(item) == 2 and torch.is_tensor(item[0])):
        raise ConfigError(
            f"{name}: items must be (input tensor, target) pairs, got {type(item).__name__}; "
            "wrap the dataset so that it yields (x, y)"
        )
    return ds


def _tensor_bytes(v: Any) -> bytes:
    if torch.is_tensor(v):
        return v.detach().cpu().contiguous().numpy().tobytes() + str(tuple(v.shape)).encode()
    return repr(v).encode()


def data_digest(ds: Dataset) -> str:
    """16 hex digits of a dataset: its class, length and a hash of some samples."""
    n = len(ds)
    h = hashlib.sha256(f"{type(ds).__qualname__}:{n}".encode())
    for i in sorted(
        {int(round(k * (n - 1) / (DIGEST_SAMPLES - 1))) for k in range(DIGEST_SAMPLES)}
    ):
        x, y = ds[i]
        h.update(_tensor_bytes(x))
        h.update(_tensor_bytes(y))
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """16 hex digits of a model: its class and state dict (names, shapes, values)."""
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(_tensor_bytes(v))
    return h.hexdigest()[:16]


def _mix(*parts: int) -> int:
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class TorchSplit:
    """A subset of a torch dataset, in the interface of :class:`layermerge.data.Split`."""

    name: str
    dataset: Dataset
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([int(self.dataset[int(i)][1]) for i in self.indices])

    def num_batches(self, batch_size: int, *, train: bool, rank: int = 0, world: int = 1) -> int:
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
        """Batches of ``(inputs, targets)``; training order shuffled from ``(seed,
        epoch)`` and shared out over ranks as :meth:`layermerge.data.Split.batches`
        does. The dataset's own transforms are its augmentation."""
        from torch.utils.data.distributed import DistributedSampler

        if train:
            sampler = DistributedSampler(
                range(len(self)), num_replicas=world, rank=rank, shuffle=True, seed=seed
            )
            sampler.set_epoch(epoch)
            order = np.asarray(list(sampler), dtype=np.int64)
        else:
            order = np.arange(rank, len(self), world, dtype=np.int64)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if train and chunks and len(chunks[-1]) < 2 and len(chunks) > 1:
            chunks.pop()
        for b, chunk in enumerate(chunks):
            # random transforms of the dataset draw from torch's generator: seeded per batch
            torch.manual_seed(_mix(seed, epoch, rank, b))
            x, y = default_collate([tuple(self.dataset[int(self.indices[i])]) for i in chunk])
            yield x, y


@dataclass
class TorchSplits:
    """The four splits of a run (:class:`layermerge.data.DataSplits`' interface) over
    torch datasets: ``train``, ``holdout-train`` (a seeded subset of train as large as
    val), ``holdout-val`` (val) and ``test`` (test, else val)."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset | None = None
    seed: int = 0
    holdout_per_class: int = 0  # not used: the holdout splits are given
    #: an importance protocol's holdout size does not redraw these splits
    fixed_holdouts: ClassVar[bool] = True
    _cache: dict[str, TorchSplit] = field(default_factory=dict, repr=False)

    def _all(self, name: str, ds: Dataset) -> TorchSplit:
        if name not in self._cache:
            self._cache[name] = TorchSplit(name, ds, np.arange(len(ds)))
        return self._cache[name]

    @property
    def train(self) -> TorchSplit:
        return self._all("train", self.train_set)

    @property
    def holdout_train(self) -> TorchSplit:
        if "holdout-train" not in self._cache:
            n = min(len(self.train_set), len(self.val_set))
            idx = np.sort(np.random.default_rng(self.seed).permutation(len(self.train_set))[:n])
            self._cache["holdout-train"] = TorchSplit("holdout-train", self.train_set, idx)
        return self._cache["holdout-train"]

    @property
    def holdout_val(self) -> TorchSplit:
        return self._all("holdout-val", self.val_set)

    @property
    def test(self) -> TorchSplit:
        return self._all("test", self.test_set if self.test_set is not None else self.val_set)

    def split(self, name: str) -> TorchSplit:
        if name not in ("train", "holdout-train", "holdout-val", "test"):
            raise ValueError(f"no split {name!r}")
        return getattr(self, name.replace("-", "_"))

    def describe(self) -> dict[str, Any]:
        return {
            "data": "python objects",
            "train_digest": data_digest(self.train_set),
            "val_digest": data_digest(self.val_set),
            "holdout_train_size": len(self.holdout_train),
            "holdout_val_size": len(self.holdout_val),
            "train_size": len(self.train),
            "split_seed": self.seed,
        }

    def digest(self) -> str:
        parts = [data_digest(self.train_set), data_digest(self.val_set)]
        if self.test_set is not None:
            parts.append(data_digest(self.test_set))
        return "-".join(parts)


def load_data_factory(spec: str) -> dict[str, Any]:
    """``python:path/to/file.py:factory``: the datasets the factory returns, as a dict
    with ``train``, ``val`` and optionally ``test`` (a dict, or a tuple in that order)."""
    body = spec.removeprefix("python:")
    path, sep, factory = body.rpartition(":")
    if not sep or not path.endswith(".py") or not factory:
        raise ConfigError(
            f"data: {spec!r}: expected python:path/to/file.py:factory (a function returning "
            "the train, val and optionally test datasets)"
        )
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"data: file {file} does not exist")
    name = f"layermerge_data_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    mspec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    mspec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ConfigError(f"data: {file} defines no function {factory!r}")
    out = fn()
    if isinstance(out, dict):
        unknown = sorted(set(out) - {"train", "val", "test"})
        if unknown or not {"train", "val"} <= set(out):
            raise ConfigError(
                f"data: {spec} returned keys {sorted(out)}; expected train, val and optionally test"
            )
        return dict(out)
    if isinstance(out, tuple | list) and len(out) in (2, 3):
        return dict(zip(("train", "val", "test"), out))
    raise ConfigError(
        f"data: {spec} returned {type(out).__name__}; return (train, val[, test]) or a dict "
        "with train, val and optionally test"
    )


def make_splits_of(data: dict[str, Any], seed: int = 0) -> TorchSplits:
    test = data.get("test")
    return TorchSplits(
        as_dataset(data["train"], "train"),
        as_dataset(data["val"], "val"),
        as_dataset(test, "test") if test is not None else None,
        seed=seed,
    )


def input_shape_of(splits: TorchSplits) -> tuple[int, ...]:
    """The shape of one input of the training set."""
    x, _ = splits.train_set[0]
    return tuple(int(v) for v in x.shape)


@dataclass
class ObjectRun(Run):
    """A run whose model is a Python object: fresh copies come from it."""

    template: nn.Module | None = None

    def fresh_model(self, weights=None) -> nn.Module:
        if self.template is None:
            return super().fresh_model(weights)
        model = copy.deepcopy(self.template)
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model


class ObjectSource:
    """What a run over objects starts from: the splits, and the model object (None:
    the config's ``model``) and task hooks (None: the config task's)."""

    def __init__(self, splits: TorchSplits, model: nn.Module | None = None, hooks=None):
        self.splits, self.model, self.hooks = splits, model, hooks

    def make_run(self, cfg, runner, device, dist, log) -> Run:
        hooks = self.hooks or hooks_for(cfg)
        if self.model is not None:
            shape = tuple(cfg.input_shape) if cfg.input_shape else input_shape_of(self.splits)
            model = copy.deepcopy(self.model).cpu()
        else:
            shape = tuple(cfg.input_shape) if cfg.input_shape else None
            loaded = load_model(cfg.model, dict(cfg.model_kwargs), None, shape)
            shape, model = tuple(loaded.input_shape), loaded.model
        run = ObjectRun(
            cfg,
            hooks,
            runner,
            device,
            dist,
            log,
            shape,
            hooks.task(),
            self.splits,
            template=self.model,
        )
        run.base_model = model
        return run
