"""Importance protocols: what one importance entry does to its network before it is
measured (a short fine-tune of a number of optimiser steps, and/or a recalibration of
the BatchNorm statistics), on holdout splits of what size, scored how, calibrated
against how many identity-plan entries. :data:`PROTOCOLS` names the built-in ones
(``layermerge importance --protocol NAME``, ``importance: {protocol: NAME}`` in a
compress config)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .data import DataError, DataSplits
from .train import Recipe, importance_recipe

REINIT_MODES = ("single", "none")


# ---------------------------------------------------------------------------
# protocols


@dataclass(frozen=True)
class Protocol:
    """What one importance entry does to its network before it is measured.

    ``steps`` optimiser steps of batch ``batch_size`` on holdout-train (``epochs``
    instead, when given: the reference's "one epoch of holdout-train"; ``steps=0``
    and no ``epochs``: no optimiser step), SGD at ``lr`` after ``warmup_steps`` of
    linear warm-up, cosine to 0; then ``bn_batches`` batches of holdout-train
    recalibrate the BatchNorm statistics (0: none). Holdout splits: ``holdout_images``
    images each (drawn per class, at most half of the smallest class each), or
    ``holdout_per_class`` when given. ``score`` picks the ``importance`` column
    (a task without it uses its own default), ``calibration`` is the number of
    identity-plan entries measured for the calibrated base.
    """

    name: str
    summary: str
    steps: int = 20
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 0.01
    warmup_steps: int = 3
    weight_decay: float = 1e-5
    holdout_images: int | None = 2560
    holdout_per_class: int | None = None
    bn_batches: int = 0
    reinit: str = "none"
    score: str = "kl"
    calibration: int = 3

    def __post_init__(self) -> None:
        if self.steps < 0 or self.bn_batches < 0 or self.calibration < 0:
            raise ValueError(f"protocol {self.name}: steps, bn_batches, calibration must be >= 0")
        if self.reinit not in REINIT_MODES:
            raise ValueError(f"protocol {self.name}: reinit must be one of {REINIT_MODES}")
        if self.holdout_images is None and self.holdout_per_class is None:
            raise ValueError(f"protocol {self.name}: needs holdout_images or holdout_per_class")

    @property
    def fine_tunes(self) -> bool:
        return self.epochs is not None or self.steps > 0

    def recipe(self, **overrides: Any) -> Recipe:
        """The fine-tune's recipe (``overrides``: recipe fields, ``None`` ignored)."""
        length = {"epochs": self.epochs} if self.epochs is not None else {"steps": self.steps}
        base = dict(
            **length,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay,
        )
        return importance_recipe(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        del d["summary"]
        return d

    def nominal_cost(self, num_classes: int, train_size: int | None = None) -> float:
        """Image passes per entry (a forward pass 1, a training step 3 per image): the
        fine-tune, the BatchNorm recalibration and the holdout-val evaluation."""
        per_class = self.holdout_per_class or math.ceil(self.holdout_images / num_classes)
        holdout = per_class * num_classes
        if self.epochs is not None:
            steps = math.ceil(self.epochs * holdout / self.batch_size)
        else:
            steps = self.steps
        return 3.0 * steps * self.batch_size + self.bn_batches * self.batch_size + holdout


#: The named importance protocols (``layermerge importance --protocol NAME``).
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "default",
            "20 SGD steps of batch 128 at lr 0.01 (3 warm-up steps), no re-initialisation, "
            "2 560 images per holdout split, KL score",
        ),
        Protocol(
            "few-steps",
            "2 SGD steps of batch 64 at lr 0.01, then BatchNorm recalibration on 1 batch; "
            "256 images per holdout split, KL score",
            steps=2,
            batch_size=64,
            warmup_steps=0,
            holdout_images=256,
            bn_batches=1,
        ),
        Protocol(
            "bn-recalib",
            "no optimiser step: BatchNorm statistics recalibrated on 2 batches of 64; "
            "256 images per holdout split, KL score",
            steps=0,
            warmup_steps=0,
            batch_size=64,
            holdout_images=256,
            bn_batches=2,
        ),
        Protocol(
            "reference",
            "the paper's protocol: one epoch of 50 images per class, batch 256, lr 0.1, "
            "the conv of single-conv blocks re-initialised, accuracy score",
            steps=0,
            epochs=1.0,
            batch_size=256,
            lr=0.1,
            warmup_steps=0,
            holdout_images=None,
            holdout_per_class=50,
            reinit="single",
            score="acc",
        ),
    )
}
DEFAULT_PROTOCOL = "default"


def get_protocol(name: str | Protocol, **overrides: Any) -> Protocol:
    """A protocol of :data:`PROTOCOLS` by name, with ``overrides`` (``None`` ignored).
    ``holdout_per_class`` given replaces ``holdout_images``; ``steps`` given replaces
    ``epochs`` (as in a training recipe)."""
    if isinstance(name, Protocol):
        p = name
    elif name in PROTOCOLS:
        p = PROTOCOLS[name]
    else:
        raise ValueError(f"unknown importance protocol {name!r}; one of {', '.join(PROTOCOLS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    if changes.get("holdout_per_class") is not None:
        changes.setdefault("holdout_images", None)
    if changes.get("steps") is not None:
        changes["epochs"] = None  # steps override epochs, as in a training recipe
    elif changes.get("epochs") is not None:
        changes.setdefault("steps", 0)
    return dataclasses.replace(p, **changes) if changes else p


def resolve_protocol(
    name: str | Protocol,
    overrides: dict[str, Any] | None = None,
    recipe_overrides: dict[str, Any] | None = None,
) -> tuple[Protocol, Recipe | None]:
    """The protocol ``name`` with ``overrides`` (its own fields), and the recipe of its
    fine-tune with ``recipe_overrides`` (recipe fields); ``None`` values are ignored.
    The recipe is ``None`` for a protocol without optimiser steps. What a config
    section and the command line both resolve through."""
    protocol = get_protocol(name, **(overrides or {}))
    if not protocol.fine_tunes:
        return protocol, None
    return protocol, protocol.recipe(**(recipe_overrides or {}))


def protocol_splits(splits: DataSplits, protocol: Protocol) -> DataSplits:
    """``splits`` with the protocol's holdout size (the holdout splits are drawn lazily).
    Splits whose holdouts the user gave (``fixed_holdouts``) are returned as they are."""
    if getattr(splits, "fixed_holdouts", False):
        return splits
    if protocol.holdout_per_class is not None:
        per_class = protocol.holdout_per_class
    else:
        import numpy as np

        labels = splits.dataset.source("train").labels
        counts = np.unique(labels, return_counts=True)[1]
        if len(counts) == 0:
            raise DataError("the training split is empty: no holdout splits can be drawn")
        per_class = math.ceil(protocol.holdout_images / len(counts))
        per_class = max(1, min(per_class, int(counts.min()) // 2))
    if per_class == splits.holdout_per_class:
        return splits
    return dataclasses.replace(splits, holdout_per_class=per_class, _cache={})
