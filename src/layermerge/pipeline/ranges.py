"""The type and range of every numeric key of a compress config (checked by
:func:`layermerge.pipeline.config.check_ranges`; the message names the key)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A compress config that cannot be run; the message says which key and why.
    (Defined here, the config module's first dependency; import it from
    :mod:`layermerge.pipeline.config` or :mod:`layermerge.pipeline`.)"""


@dataclass(frozen=True)
class Num:
    """The type and range of a numeric key: ``lo``/``hi`` bounds (``*_open``: the bound
    itself excluded), ``null``: None allowed, ``unit``: what a whole number counts.
    Every value must be finite."""

    kind: type
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    null: bool = False
    unit: str = ""

    def check(self, value: Any, where: str) -> None:
        if value is None and self.null:
            return
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if self.kind is int:
            ok = ok and isinstance(value, int)
        ok = ok and math.isfinite(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise ConfigError(f"{where}: {self.describe()}, got {value!r}")

    def describe(self) -> str:
        """E.g. "a whole number of steps >= 1 or null", "a number > 0", "in [0, 1)"."""
        if self.lo is not None and self.hi is not None:
            lo, hi = "(["[not self.lo_open], ")]"[not self.hi_open]
            rng = f"in {lo}{self.lo:g}, {self.hi:g}{hi}"
        else:
            rng = f"{'>' if self.lo_open else '>='} {self.lo:g}" if self.lo is not None else ""
        if self.kind is int:
            rng = f"a whole number{' of ' + self.unit if self.unit else ''} {rng}".strip()
        elif not rng.startswith("in "):
            rng = f"a number {rng}".strip()
        return rng + " or null" * self.null


_COUNT = Num(int, 1)  # a whole number >= 1
_POSITIVE = Num(float, 0, lo_open=True)  # a number > 0
_NONNEG = Num(float, 0)
_FRACTION = Num(float, 0, 1, hi_open=True)  # [0, 1)
_RECIPE_RANGES = {
    "epochs": _POSITIVE,
    "steps": Num(int, 1, null=True, unit="steps"),
    "batch_size": _COUNT,
    "lr": _POSITIVE,
    "momentum": _FRACTION,
    "weight_decay": _NONNEG,
    "warmup_epochs": _NONNEG,
    "label_smoothing": _FRACTION,
    "ema_decay": _FRACTION,
    "grad_clip": Num(float, 0, lo_open=True, null=True),
}
#: the type and range of every numeric key, by section ("" for the top level); keys a
#: section does not have (the other task's) are skipped
NUMERIC_RANGES: dict[str, dict[str, Num]] = {
    "": {
        "seed": Num(int, 0),
        "threads": Num(int, 1, null=True, unit="threads"),
        "workers": Num(int, 0, unit="processes"),
    },
    "train": _RECIPE_RANGES,
    "importance": {
        **_RECIPE_RANGES,
        # None: the protocol's
        "steps": Num(int, 0, null=True, unit="steps"),
        "epochs": Num(float, 0, lo_open=True, null=True),
        "batch_size": Num(int, 1, null=True),
        "lr": Num(float, 0, lo_open=True, null=True),
        "weight_decay": Num(float, 0, null=True),
        "warmup_steps": Num(int, 0, null=True, unit="steps"),
        "holdout_images": Num(int, 1, null=True, unit="images"),
        "holdout_per_class": Num(int, 1, null=True, unit="images"),
        "bn_batches": Num(int, 0, null=True, unit="batches"),
        "calibration": Num(int, 0, null=True, unit="entries"),
        "eval_draws": _COUNT,
    },
    "finetune": {
        **_RECIPE_RANGES,
        "seeds": Num(int, 1, unit="seeds"),
        "distill": Num(float, 0, 1),
        "distill_temperature": _POSITIVE,
    },
    "latency": {
        "threads": _COUNT,
        "batch_size": _COUNT,
        "max_time_s": _POSITIVE,
        "warmup_runs": Num(int, 0, unit="runs"),
        "runs": Num(int, 1, unit="runs"),
    },
    "solve": {"precision": Num(float, 0, lo_open=True, null=True)},
    "benchmark": {
        "rounds": Num(int, 1, unit="rounds"),
        "calls_per_round": Num(int, 1, unit="calls"),
        "max_time_s": _POSITIVE,
        "forward_rounds": Num(int, 1, null=True, unit="rounds"),
        "sampling_steps": Num(int, 1, unit="steps"),
    },
    "schedule": {
        "num_train_timesteps": _COUNT,
        "beta_start": Num(float, 0, 1, lo_open=True, hi_open=True),
        "beta_end": Num(float, 0, 1, lo_open=True, hi_open=True),
    },
    "quality": {"n": _COUNT, "steps": _COUNT, "batch_size": _COUNT, "classifier_steps": _COUNT},
}
