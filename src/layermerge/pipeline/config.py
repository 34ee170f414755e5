"""The typed config of ``layermerge compress``, for both tasks.

One :class:`CompressConfig` describes a run: the model and data, and a section
per stage (``train``, ``latency``, ``importance``, ``solve``, ``finetune``,
``export``, ``benchmark``), plus ``schedule`` and ``quality`` for
``task: diffusion``. A section holds the keys of both tasks; each task has its
own defaults (:data:`TASK_DEFAULTS`) and refuses the keys that mean nothing to
it (a section's ``ONLY`` names them), so a config is checked up front with a
message naming the key. Reading files (packaged configs, ``smoke:``, ``--set``,
``${VAR}``) is :mod:`layermerge.pipeline.loading`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from ..channelprune import MISSING as CHANNELPRUNE_MISSING
from ..channelprune import available as channelprune_available
from ..protocols import PROTOCOLS as IMPORTANCE_PROTOCOLS
from ..protocols import Protocol, resolve_protocol
from ..solve import METHODS, SCORE_MODES
from ..tasks import ClassificationTask
from ..train import IMPORTANCE_RECIPE, Recipe
from .ranges import NUMERIC_RANGES, ConfigError, Num

TASKS = ("classification", "diffusion")
#: methods of solve.methods that give networks, not plans (compared against LayerMerge)
NETWORK_METHODS = ("channelprune",)
BACKENDS = ("onnxruntime", "torch")
EXPORT_FORMATS = ("onnx", "pt2", "torchscript")
PROTOCOLS = ("adaptive", "reference")
FEATURES = ("classifier", "inception")
REINIT = ("single", "none")
IMPORTANCE_SCORES = ClassificationTask.importance_scores
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


# --------------------------------------------------------------------------- sections
#
# ADDED_LATER: keys added after a section first shipped; left out of stage keys while at
# their defaults, so that run directories made before them stay cached (see
# CompressConfig.section). ONLY: keys that one task alone accepts.


@dataclass
class TrainSection:
    """How the base network is trained when no ``weights`` are given."""

    epochs: float = 2.0
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    amp: bool = True  # mixed precision (bfloat16, else float16) on CUDA; no effect on the CPU
    ema_decay: float = 0.0  # EMA of the weights (0: off)
    grad_clip: float | None = None

    ADDED_LATER: ClassVar[tuple[str, ...]] = (
        "momentum",
        "nesterov",
        "amp",
        "ema_decay",
        "grad_clip",
    )
    ONLY: ClassVar[dict[str, str]] = {"label_smoothing": "classification"}


@dataclass
class LatencySection:
    backends: list[str] = field(default_factory=lambda: ["onnxruntime", "torch"])
    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    max_time_s: float = 0.5  # adaptive protocol: cap on one entry's timed calls
    # adaptive: time each entry until its statistic is stable (or max_time_s);
    # reference: exactly warmup_runs + runs calls per entry, as the reference implementation
    protocol: str = "adaptive"
    warmup_runs: int = 300
    runs: int = 200
    # ONNX Runtime execution providers in priority order (None: CPU, or CUDA on cuda)
    providers: list[str] | None = None

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("protocol", "warmup_runs", "runs", "providers")
    ONLY: ClassVar[dict[str, str]] = {}


@dataclass
class ImportanceSection:
    """How each option is scored: a named importance protocol (``protocol``: default,
    few-steps, bn-recalib or reference; ``layermerge importance --help`` describes
    them) with any of its settings overridden here (``None``: the protocol's)."""

    protocol: str = "default"
    steps: int | None = None
    epochs: float | None = None  # the reference's "one epoch of holdout-train"
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float | None = None
    holdout_images: int | None = None  # images per holdout split
    holdout_per_class: int | None = None  # instead of holdout_images
    bn_batches: int | None = None  # BatchNorm recalibration batches after the fine-tune
    # single: re-initialise the conv of one-conv blocks before the fine-tune (reference)
    reinit: str | None = None
    score: str | None = None  # kl, loss or acc (classification; diffusion: its loss ratio)
    calibration: int | None = None  # identity-plan entries: the calibrated base, noise floor
    # fine-tune settings no protocol changes (the reference's)
    optimizer: str = IMPORTANCE_RECIPE["optimizer"]
    momentum: float = IMPORTANCE_RECIPE["momentum"]
    nesterov: bool = IMPORTANCE_RECIPE["nesterov"]
    warmup_epochs: float = IMPORTANCE_RECIPE["warmup_epochs"]
    grad_clip: float | None = None
    amp: bool = True
    eval_draws: int = 1  # diffusion: fixed noise draws per holdout image

    ADDED_LATER: ClassVar[tuple[str, ...]] = (
        "momentum",
        "nesterov",
        "amp",
        "optimizer",
        "warmup_epochs",
        "grad_clip",
    )
    ONLY: ClassVar[dict[str, str]] = {"eval_draws": "diffusion"}

    #: the keys that override the protocol's settings
    PROTOCOL_KEYS: ClassVar[tuple[str, ...]] = (
        "steps",
        "epochs",
        "batch_size",
        "lr",
        "warmup_steps",
        "weight_decay",
        "holdout_images",
        "holdout_per_class",
        "bn_batches",
        "reinit",
        "score",
        "calibration",
    )

    def resolve(self, seed: int) -> tuple[Protocol, Recipe | None]:
        """The protocol with this section's overrides, and its fine-tune recipe
        (``None`` for a protocol without optimiser steps)."""
        return resolve_protocol(
            self.protocol,
            {k: getattr(self, k) for k in self.PROTOCOL_KEYS},
            dict(
                optimizer=self.optimizer,
                momentum=self.momentum,
                nesterov=self.nesterov,
                warmup_epochs=self.warmup_epochs,
                grad_clip=self.grad_clip,
                amp=self.amp,
                seed=seed,
            ),
        )


@dataclass
class SolveSection:
    methods: list[str] = field(default_factory=lambda: ["layermerge", "kim23", "layerprune"])
    # fractions of the base latency (classification: the whole network's; diffusion: the
    # table latency of the unmodified network's chain, the constant rest on top)
    budgets: list[float] = field(default_factory=lambda: [0.7, 0.6, 0.5])
    score: str = "exp"
    # None: the exact solver; a number P solves on a grid of 1/P ms (opt-in, coarser)
    precision: float | None = None
    # > 1: fine-tune the K best Pareto-optimal plans per budget briefly, keep the best
    rerank: int = 0
    rerank_steps: int = 50  # the steps of each re-ranking fine-tune
    # channel pruning: the width roundings its search tries (each pruned layer's width
    # a multiple of N; null: any width), keeping the network within the budget with the
    # most parameters. Widths off the runtime's vector block (8 or 16 channels on
    # ONNX Runtime's CPU kernels) can run far slower; on narrow networks rounding
    # leaves too little to prune. A single value tries only that one.
    channelprune_round_to: list[int | None] = field(default_factory=lambda: [8, None])

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("rerank", "rerank_steps", "channelprune_round_to")
    LISTS_OF_ONE: ClassVar[tuple[str, ...]] = ("channelprune_round_to",)
    ONLY: ClassVar[dict[str, str]] = {}


@dataclass
class FinetuneSection:
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    nesterov: bool = True
    amp: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    distill: float = 0.0  # weight of the distillation loss from the uncompressed network
    distill_temperature: float = 4.0
    ema_decay: float = 0.0
    grad_clip: float | None = None
    seeds: int = 1  # fine-tunes per plan (seed, seed + 1, ...): the report's mean and SD

    ADDED_LATER: ClassVar[tuple[str, ...]] = (
        "momentum",
        "nesterov",
        "amp",
        "ema_decay",
        "grad_clip",
        "seeds",
    )
    ONLY: ClassVar[dict[str, str]] = {
        "label_smoothing": "classification",
        "distill_temperature": "classification",
    }


@dataclass
class ExportSection:
    # each plan's folder ships these (the onnxruntime benchmark times the ONNX file)
    formats: list[str] = field(default_factory=lambda: ["onnx", "pt2"])

    ADDED_LATER: ClassVar[tuple[str, ...]] = ()
    ONLY: ClassVar[dict[str, str]] = {}


@dataclass
class BenchmarkSection:
    """Whole-network timings of each plan against the base, interleaved."""

    rounds: int = 10  # rounds of every benchmark (forward_rounds overrides the forward one's)
    calls_per_round: int = 5
    max_time_s: float = 30.0
    forward_rounds: int | None = None
    sampling_steps: int = 100  # diffusion: DDIM steps of one timed sampling run

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("forward_rounds",)
    ONLY: ClassVar[dict[str, str]] = {"sampling_steps": "diffusion"}


@dataclass
class ScheduleSection:
    """The noise schedule of a diffusion model (DDPM's linear betas by default)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    ADDED_LATER: ClassVar[tuple[str, ...]] = ()
    ONLY: ClassVar[dict[str, str]] = {}


@dataclass
class QualitySection:
    """FID of DDIM samples against the test split, in the features of a classifier
    trained on the same data (or Inception's, ``features: inception``)."""

    n: int = 200
    steps: int = 25
    batch_size: int = 100
    classifier: str = "layermerge:resnet20"
    classifier_kwargs: dict[str, Any] = field(default_factory=lambda: {"in_chans": 1})
    classifier_weights: str | None = None
    classifier_steps: int = 300
    features: str = "classifier"
    inception_weights: str | None = None

    ADDED_LATER: ClassVar[tuple[str, ...]] = ()
    ONLY: ClassVar[dict[str, str]] = {}


SECTIONS: dict[str, type] = {
    "train": TrainSection,
    "latency": LatencySection,
    "importance": ImportanceSection,
    "solve": SolveSection,
    "finetune": FinetuneSection,
    "export": ExportSection,
    "benchmark": BenchmarkSection,
    "schedule": ScheduleSection,
    "quality": QualitySection,
}
#: sections that only one task has
TASK_SECTIONS = {"schedule": "diffusion", "quality": "diffusion"}

# what the diffusion task uses when a config does not say: AdamW without weight decay
# and EMA, small budgets of the table latency, FID of 200 DDIM samples
_ADAMW = {"optimizer": "adamw", "weight_decay": 0.0, "amp": False}
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "classification": {},
    "diffusion": {
        "train": {
            **_ADAMW,
            "steps": 700,
            "batch_size": 32,
            "lr": 1e-3,
            "ema_decay": 0.995,
            "warmup_epochs": 0.02,
            "grad_clip": 1.0,
        },
        "latency": {"max_time_s": 0.3},
        "importance": {
            **_ADAMW,
            "holdout_per_class": 10,
            "steps": 5,
            "batch_size": 32,
            "lr": 1e-4,
            "warmup_epochs": 0.0,
            "warmup_steps": 0,
            "eval_draws": 2,
            "reinit": "none",
        },
        "solve": {"methods": ["layermerge"], "budgets": [0.85, 0.7]},
        "finetune": {
            **_ADAMW,
            "steps": 150,
            "batch_size": 32,
            "lr": 2e-4,
            "ema_decay": 0.99,
            "distill": 0.5,
            "grad_clip": 1.0,
        },
        "benchmark": {"rounds": 2, "forward_rounds": 6, "calls_per_round": 3, "max_time_s": 60.0},
        # a UNet's torch.export program takes a minute or more: add pt2 to ship it
        "export": {"formats": ["onnx"]},
    },
}


def section_defaults(name: str, task: str = "classification"):
    """Section ``name`` at ``task``'s defaults."""
    return SECTIONS[name](**TASK_DEFAULTS[task].get(name, {}))


def allowed_keys(cls: type, task: str) -> set[str]:
    only = getattr(cls, "ONLY", {})
    return {f.name for f in fields(cls) if only.get(f.name, task) == task}


@dataclass
class CompressConfig:
    model: str
    data: str
    task: str = "classification"  # classification | diffusion: the task hooks of the run
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    weights: str | None = None
    seed: int = 0
    # training, importance and evaluation: cpu, cuda, cuda:N or auto (CUDA when available)
    device: str = "auto"
    threads: int | None = None  # torch threads for training and evaluation (default: torch's)
    workers: int = 0  # processes decoding image-folder batches (0: in the main process)
    # classification: {mean: [...], std: [...]} the model's inputs are normalised with
    # (default: a timm model's pretrained_cfg, else the dataset's statistics)
    normalize: dict[str, Any] | None = None
    # None (``train: null``): the base network must come from ``weights``
    train: TrainSection | None = field(default_factory=TrainSection)
    latency: LatencySection = field(default_factory=LatencySection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    solve: SolveSection = field(default_factory=SolveSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)
    schedule: ScheduleSection | None = None  # diffusion
    quality: QualitySection | None = None  # diffusion
    # overrides that shrink the config to a quick check (see loading.apply_smoke); applied
    # by `layermerge compress --smoke`, which sets is_smoke (recorded in the report)
    smoke: dict[str, Any] = field(default_factory=dict)
    is_smoke: bool = False

    #: top-level keys of the diffusion task only
    ONLY: ClassVar[dict[str, str]] = {
        "schedule": "diffusion",
        "quality": "diffusion",
        "normalize": "classification",
    }

    def section(self, name: str) -> dict[str, Any]:
        """One section's settings as stage keys hold them: the task's keys, those the
        section lists in ``ADDED_LATER`` left out while at the task's defaults."""
        sec = getattr(self, name)
        if sec is None:
            return {}
        d = asdict(sec)
        allowed = allowed_keys(type(sec), self.task)
        default = section_defaults(name, self.task)
        for k in list(d):
            if k not in allowed or (k in sec.ADDED_LATER and d[k] == getattr(default, k)):
                del d[k]
        return d

    def recipe(self, name: str, **extra: Any) -> Recipe | None:
        """The training recipe of section ``name`` (train, importance or finetune;
        importance: its protocol's fine-tune, ``None`` for a protocol without one)."""
        if name == "importance":
            return self.importance.resolve(self.seed)[1]
        return section_recipe(getattr(self, name), **{"seed": self.seed, **extra})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def section_recipe(section: Any, **extra: Any) -> Recipe:
    """A :class:`~layermerge.train.Recipe` of the section's training keys."""
    keys = {f.name for f in fields(Recipe)}
    d = {k: v for k, v in vars(section).items() if k in keys}
    return Recipe(**{**d, **extra})


# --------------------------------------------------------------------------- parsing


def check_keys(d: dict, cls: type, where: str, task: str = "classification") -> None:
    allowed = allowed_keys(cls, task)
    unknown = sorted(set(d) - allowed)
    if unknown:
        only = getattr(cls, "ONLY", {})
        other = [k for k in unknown if k in only]
        hint = "".join(f"; {k} is a key of task: {only[k]} configs" for k in other)
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            f"{hint}"
        )


def _typed(value: Any, default: Any, where: str) -> Any:
    if default is None or value is None:
        return value
    kind = type(default)
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is list and isinstance(value, list):
        return value
    if kind is dict and isinstance(value, dict):
        return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def config_task(data: Any, where: str = "config") -> str:
    """The ``task`` a raw config names (classification when it names none)."""
    task = data.get("task", "classification") if isinstance(data, dict) else "classification"
    if task not in TASKS:
        raise ConfigError(f"{where}.task: one of {', '.join(TASKS)}, got {task!r}")
    return task


def _parse_section(name: str, value: Any, task: str, where: str):
    cls = SECTIONS[name]
    if not isinstance(value, dict):
        raise ConfigError(f"{where}.{name}: expected a mapping")
    check_keys(value, cls, f"{where}.{name}", task)
    base = cls()  # types come from the class's defaults
    lists = getattr(cls, "LISTS_OF_ONE", ())
    value = {k: [v] if k in lists and not isinstance(v, list) else v for k, v in value.items()}
    typed = {k: _typed(v, getattr(base, k), f"{where}.{name}.{k}") for k, v in value.items()}
    return replace(section_defaults(name, task), **typed)


def parse_config(data: dict[str, Any], where: str = "config") -> CompressConfig:
    """Validate a config dict up front, with messages naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a mapping of keys to values")
    task = config_task(data, where)
    check_keys(data, CompressConfig, where, task)
    if "is_smoke" in data:
        raise ConfigError(
            f"{where}.is_smoke: set by `layermerge compress --smoke`, not in a config"
        )
    if "smoke" in data:
        check_smoke(data["smoke"], f"{where}.smoke", task)
    for req in ("model", "data"):
        if req not in data:
            raise ConfigError(f"{where}: missing required key {req!r}")
    defaults = CompressConfig(model="", data="")
    kwargs: dict[str, Any] = {"task": task}
    for name in SECTIONS:
        if name in TASK_SECTIONS and TASK_SECTIONS[name] != task:
            continue
        if name == "train" and name in data and data[name] is None:
            kwargs[name] = None  # no training: the base network comes from weights
        else:
            kwargs[name] = _parse_section(name, data.get(name, {}), task, where)
    for f in fields(CompressConfig):
        if f.name in data and f.name not in SECTIONS and f.name != "task":
            default = getattr(defaults, f.name)
            kwargs[f.name] = _typed(data[f.name], default, f"{where}.{f.name}")
    cfg = CompressConfig(**kwargs)
    _validate(cfg, where)
    return cfg


def check_ranges(cfg: CompressConfig, where: str = "config") -> None:
    """Every numeric key of ``cfg`` (both tasks' sections) has its type and is in its
    range (:data:`NUMERIC_RANGES`); the message names the key."""
    for name, ranges in NUMERIC_RANGES.items():
        sec = getattr(cfg, name) if name else cfg
        if sec is None:
            continue
        allowed = allowed_keys(type(sec), cfg.task)
        for key, rng in ranges.items():
            if key in allowed:
                rng.check(getattr(sec, key), f"{where}.{name}.{key}" if name else f"{where}.{key}")


#: the solve section's re-ranking keys (checked beside :data:`NUMERIC_RANGES`)
RERANK_RANGES = {"rerank": Num(int, 0, unit="plans"), "rerank_steps": Num(int, 1, unit="steps")}


def _validate(cfg: CompressConfig, where: str) -> None:
    check_ranges(cfg, where)
    for key, rng in RERANK_RANGES.items():
        rng.check(getattr(cfg.solve, key), f"{where}.solve.{key}")
    bad = [m for m in cfg.solve.methods if m not in METHODS + NETWORK_METHODS]
    if bad:
        known = list(METHODS + NETWORK_METHODS)
        raise ConfigError(f"{where}.solve.methods: unknown {bad}; use {known}")
    rts = cfg.solve.channelprune_round_to
    if not rts or any(
        rt is not None and (isinstance(rt, bool) or not isinstance(rt, int) or rt < 1) for rt in rts
    ):
        raise ConfigError(
            f"{where}.solve.channelprune_round_to: positive numbers of channels or null for "
            f"any width (e.g. [8, null]), got {rts!r}"
        )
    if "channelprune" in cfg.solve.methods:
        if cfg.task != "classification":
            raise ConfigError(f"{where}.solve.methods: channelprune is for classification only")
        if not channelprune_available():
            raise ConfigError(f"{where}.solve.methods: {CHANNELPRUNE_MISSING}")
    if not cfg.solve.methods:
        raise ConfigError(f"{where}.solve.methods: give at least one method")
    if "layermerge" not in cfg.solve.methods:
        raise ConfigError(f"{where}.solve.methods: must include layermerge")
    budgets = cfg.solve.budgets
    if not budgets or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets
    ):
        of = "the table latency" if cfg.task == "diffusion" else "the base latency"
        raise ConfigError(f"{where}.solve.budgets: give fractions of {of} in (0, 1], got {budgets}")
    if cfg.solve.score not in SCORE_MODES:
        raise ConfigError(f"{where}.solve.score: use one of {list(SCORE_MODES)}")
    if not cfg.latency.backends or not set(cfg.latency.backends) <= set(BACKENDS):
        raise ConfigError(f"{where}.latency.backends: use a list from {sorted(BACKENDS)}")
    if not set(cfg.export.formats) <= set(EXPORT_FORMATS):
        raise ConfigError(f"{where}.export.formats: use a list from {sorted(EXPORT_FORMATS)}")
    if cfg.input_shape is not None and (
        len(cfg.input_shape) != 3 or not all(isinstance(x, int) and x > 0 for x in cfg.input_shape)
    ):
        raise ConfigError(f"{where}.input_shape: expected [C, H, W], got {cfg.input_shape}")
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise ConfigError(f"{where}.weights: file {cfg.weights} does not exist")
    if cfg.threads is not None and not (isinstance(cfg.threads, int) and cfg.threads > 0):
        raise ConfigError(f"{where}.threads: a positive number of threads, got {cfg.threads!r}")
    if not 0 <= cfg.finetune.distill <= 1:
        raise ConfigError(f"{where}.finetune.distill: a weight in [0, 1]")
    for name in ("device", "latency.device"):
        dev = cfg.device if name == "device" else cfg.latency.device
        if not (isinstance(dev, str) and _DEVICE.fullmatch(dev)) or (
            name != "device" and dev == "auto"
        ):
            raise ConfigError(f"{where}.{name}: cpu, cuda or cuda:N, got {dev!r}")
    if cfg.workers < 0:
        raise ConfigError(f"{where}.workers: a number of processes >= 0, got {cfg.workers}")
    _validate_latency(cfg.latency, f"{where}.latency")
    for name in ("train", "finetune"):
        if getattr(cfg, name) is not None:
            _check_recipe(getattr(cfg, name), f"{where}.{name}")
    _validate_importance(cfg, f"{where}.importance")
    if cfg.normalize is not None:
        _validate_normalize(cfg.normalize, f"{where}.normalize")
    _validate_benchmark(cfg.benchmark, f"{where}.benchmark")
    if cfg.quality is not None:
        _validate_quality(cfg.quality, f"{where}.quality")
    if cfg.schedule is not None:
        _validate_schedule(cfg.schedule, f"{where}.schedule")


def _validate_latency(lat: LatencySection, where: str) -> None:
    if lat.protocol not in PROTOCOLS:
        raise ConfigError(f"{where}.protocol: one of {', '.join(PROTOCOLS)}, got {lat.protocol!r}")
    if lat.warmup_runs < 0 or lat.runs < 1 or not lat.max_time_s > 0:
        raise ConfigError(f"{where}: need warmup_runs >= 0, runs >= 1 and max_time_s > 0")
    if lat.threads < 1 or lat.batch_size < 1:
        raise ConfigError(f"{where}: threads and batch_size must be >= 1")
    if lat.providers is not None:
        if not (
            isinstance(lat.providers, list)
            and lat.providers
            and all(isinstance(x, str) and x for x in lat.providers)
        ):
            raise ConfigError(
                f"{where}.providers: a list of ONNX Runtime execution providers, e.g. "
                f"[TensorrtExecutionProvider, CUDAExecutionProvider], got {lat.providers!r}"
            )
        if "onnxruntime" not in lat.backends:
            raise ConfigError(
                f"{where}.providers: execution providers are an onnxruntime setting, and "
                f"{where}.backends does not list onnxruntime"
            )


def _validate_benchmark(b: BenchmarkSection, where: str) -> None:
    if b.rounds < 1 or b.calls_per_round < 1 or not b.max_time_s > 0:
        raise ConfigError(f"{where}: need rounds >= 1, calls_per_round >= 1 and max_time_s > 0")
    fr = b.forward_rounds
    if fr is not None and not (isinstance(fr, int) and not isinstance(fr, bool) and fr >= 1):
        raise ConfigError(f"{where}.forward_rounds: a whole number >= 1, got {fr!r}")
    if b.sampling_steps < 1:
        raise ConfigError(f"{where}.sampling_steps: >= 1, got {b.sampling_steps}")


def _validate_quality(q: QualitySection, where: str) -> None:
    if min(q.n, q.steps, q.batch_size, q.classifier_steps) < 1:
        raise ConfigError(f"{where}: n, steps, batch_size and classifier_steps must be >= 1")
    if q.features not in FEATURES:
        raise ConfigError(f"{where}.features: one of {', '.join(FEATURES)}, got {q.features!r}")
    for k in ("classifier_weights", "inception_weights"):
        v = getattr(q, k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}.{k}: a file path or null, got {v!r}")


def _validate_schedule(s: ScheduleSection, where: str) -> None:
    if s.num_train_timesteps < 1 or not 0 < s.beta_start < s.beta_end < 1:
        raise ConfigError(
            f"{where}: need num_train_timesteps >= 1 and 0 < beta_start < beta_end < 1"
        )


def _validate_normalize(norm: Any, where: str) -> None:
    """``{mean: [...], std: [...]}``: 1 or 3 finite means, as many positive stds."""
    if not isinstance(norm, dict) or set(norm) != {"mean", "std"}:
        raise ConfigError(f"{where}: a mapping with the keys mean and std, got {norm!r}")
    mean, std = norm["mean"], norm["std"]

    def numbers(v: Any) -> bool:
        return isinstance(v, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v
        )

    if not (numbers(mean) and numbers(std)) or len(mean) not in (1, 3) or len(std) != len(mean):
        raise ConfigError(
            f"{where}: mean and std are lists of 1 or 3 numbers each (one per channel), "
            f"got mean={mean!r}, std={std!r}"
        )
    if min(std) <= 0:
        raise ConfigError(f"{where}.std: every std must be > 0, got {std!r}")


def _validate_importance(cfg: CompressConfig, where: str) -> None:
    imp = cfg.importance
    if imp.protocol not in IMPORTANCE_PROTOCOLS:
        raise ConfigError(
            f"{where}.protocol: one of {', '.join(IMPORTANCE_PROTOCOLS)}, got {imp.protocol!r}"
        )
    if imp.reinit is not None and imp.reinit not in REINIT:
        raise ConfigError(f"{where}.reinit: one of {', '.join(REINIT)} or null, got {imp.reinit!r}")
    if imp.score is not None and imp.score not in IMPORTANCE_SCORES:
        raise ConfigError(
            f"{where}.score: one of {', '.join(IMPORTANCE_SCORES)} or null, got {imp.score!r}"
        )
    if imp.eval_draws < 1:
        raise ConfigError(f"{where}.eval_draws: >= 1, got {imp.eval_draws}")
    if not 0 <= imp.momentum < 1:
        raise ConfigError(f"{where}.momentum: in [0, 1), got {imp.momentum}")
    try:
        protocol, _ = imp.resolve(cfg.seed)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not protocol.fine_tunes and not protocol.bn_batches:
        raise ConfigError(
            f"{where}: protocol {protocol.name} with steps: 0 makes no optimiser step and "
            "bn_batches is 0, so it would measure the compressed network untouched; set "
            "steps or bn_batches"
        )


def _check_recipe(section, where: str) -> None:
    """The training settings of ``section`` make a valid :class:`~layermerge.train.Recipe`."""
    if section.steps is not None and not (
        isinstance(section.steps, int) and not isinstance(section.steps, bool)
    ):
        raise ConfigError(f"{where}.steps: a whole number of steps, got {section.steps!r}")
    if not 0 <= section.momentum < 1:
        raise ConfigError(f"{where}.momentum: in [0, 1), got {section.momentum}")
    if section.weight_decay < 0:
        raise ConfigError(f"{where}.weight_decay: >= 0, got {section.weight_decay}")
    smoothing = getattr(section, "label_smoothing", 0.0)
    if not 0 <= smoothing < 1:
        raise ConfigError(f"{where}.label_smoothing: in [0, 1), got {smoothing}")
    clip = section.grad_clip
    if clip is not None and not (isinstance(clip, int | float) and not isinstance(clip, bool)):
        raise ConfigError(f"{where}.grad_clip: a number > 0 or null, got {clip!r}")
    try:
        section_recipe(section)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def check_smoke(smoke: Any, where: str, task: str = "classification") -> None:
    """A smoke section overrides keys of the config itself: the same names, checked here
    (their values are checked when ``--smoke`` applies them)."""
    if not isinstance(smoke, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys to their smoke values")
    bad = sorted({"smoke", "is_smoke", "task"} & set(smoke))
    if bad:
        raise ConfigError(f"{where}: cannot override {', '.join(bad)}")
    check_keys(smoke, CompressConfig, where, task)
    for name, value in smoke.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping")
            check_keys(value, SECTIONS[name], f"{where}.{name}", task)
