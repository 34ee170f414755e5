"""``layermerge compress CONFIG.yaml``: model -> faster model, every stage cached.

trace -> base weights (given, or trained) -> latency tables (one per backend)
-> importance tables -> solve (every method and budget) -> fine-tune -> merge
and verify -> export -> benchmark -> report, in a run directory. Each stage
is recorded with the hash of everything it depends on (see
:mod:`layermerge.stages`): rerunning a finished run does nothing, and changing
one setting redoes only the stages that depend on it. Identical plans chosen
by different methods or budgets share one fine-tuning.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .stages import StageRunner, digest, file_digest


class ConfigError(ValueError):
    """A compress config that cannot be run; the message says which key and why."""


# --------------------------------------------------------------------------- config


@dataclass
class TrainSection:
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

    #: keys added after the section first shipped: left out of stage keys while at their
    #: defaults, so that runs made before them stay cached (see CompressConfig.section)
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("momentum", "nesterov", "amp")


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


def _importance_default(key: str) -> Any:
    from .train import IMPORTANCE_RECIPE

    return IMPORTANCE_RECIPE[key]


@dataclass
class ImportanceSection:
    """The short fine-tune that scores each option (DESIGN §6); defaults: the reference's."""

    holdout_per_class: int = 50
    epochs: float = field(default_factory=lambda: _importance_default("epochs"))
    steps: int | None = None
    batch_size: int = field(default_factory=lambda: _importance_default("batch_size"))
    lr: float = field(default_factory=lambda: _importance_default("lr"))
    momentum: float = field(default_factory=lambda: _importance_default("momentum"))
    nesterov: bool = field(default_factory=lambda: _importance_default("nesterov"))
    weight_decay: float = field(default_factory=lambda: _importance_default("weight_decay"))
    amp: bool = True

    # weight_decay is always part of the stage key: before it was a key, compress used
    # 5e-4 here, so an old run's importance table is not one of the new default's
    ADDED_LATER: ClassVar[tuple[str, ...]] = ("momentum", "nesterov", "amp")


@dataclass
class SolveSection:
    methods: list[str] = field(default_factory=lambda: ["layermerge", "kim23", "layerprune"])
    budgets: list[float] = field(default_factory=lambda: [0.7, 0.6, 0.5])
    score: str = "exp"
    precision: float = 100.0


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

    ADDED_LATER: ClassVar[tuple[str, ...]] = ("momentum", "nesterov", "amp")


@dataclass
class ExportSection:
    formats: list[str] = field(default_factory=lambda: ["onnx"])


@dataclass
class BenchmarkSection:
    rounds: int = 10
    calls_per_round: int = 5
    max_time_s: float = 30.0


@dataclass
class CompressConfig:
    model: str
    data: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: list[int] | None = None
    weights: str | None = None
    seed: int = 0
    device: str = "cpu"  # training, importance and evaluation: cpu, cuda, cuda:N or auto
    threads: int | None = None  # torch threads for training and evaluation (default: torch's)
    workers: int = 0  # processes decoding image-folder batches (0: in the main process)
    train: TrainSection = field(default_factory=TrainSection)
    latency: LatencySection = field(default_factory=LatencySection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    solve: SolveSection = field(default_factory=SolveSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)
    # overrides that shrink the config to a quick check (see apply_smoke); applied by
    # `layermerge compress --smoke`, which sets is_smoke (recorded in the report)
    smoke: dict[str, Any] = field(default_factory=dict)
    is_smoke: bool = False

    def section(self, name: str) -> dict[str, Any]:
        """One section's settings as stage keys hold them: keys the section lists in
        ``ADDED_LATER`` are left out while at their defaults."""
        from dataclasses import asdict

        sec = getattr(self, name)
        d = asdict(sec)
        default = type(sec)()
        for k in getattr(sec, "ADDED_LATER", ()):
            if d[k] == getattr(default, k):
                del d[k]
        return d


_SECTIONS = {
    "train": TrainSection,
    "latency": LatencySection,
    "importance": ImportanceSection,
    "solve": SolveSection,
    "finetune": FinetuneSection,
    "export": ExportSection,
    "benchmark": BenchmarkSection,
}


def _check_keys(d: dict, cls, where: str) -> None:
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
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


def parse_config(data: dict[str, Any], where: str = "config") -> CompressConfig:
    """Validate a config dict up front, with messages naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config must be a mapping of keys to values")
    _check_keys(data, CompressConfig, where)
    if "is_smoke" in data:
        raise ConfigError(
            f"{where}.is_smoke: set by `layermerge compress --smoke`, not in a config"
        )
    if "smoke" in data:
        _check_smoke(data["smoke"], f"{where}.smoke")
    for req in ("model", "data"):
        if req not in data:
            raise ConfigError(f"{where}: missing required key {req!r}")
    defaults = CompressConfig(model="", data="")
    kwargs: dict[str, Any] = {}
    for f in fields(CompressConfig):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name in _SECTIONS:
            cls = _SECTIONS[f.name]
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{f.name}: expected a mapping")
            _check_keys(value, cls, f"{where}.{f.name}")
            base = cls()
            kwargs[f.name] = cls(
                **{
                    k: _typed(v, getattr(base, k), f"{where}.{f.name}.{k}")
                    for k, v in value.items()
                }
            )
        else:
            default = getattr(defaults, f.name)
            kwargs[f.name] = _typed(value, default if default != "" else "", f"{where}.{f.name}")
    cfg = CompressConfig(**kwargs)
    _validate(cfg, where)
    return cfg


def _validate(cfg: CompressConfig, where: str) -> None:
    from .solve import METHODS, SCORE_MODES

    bad = [m for m in cfg.solve.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"{where}.solve.methods: unknown {bad}; use {list(METHODS)}")
    if not cfg.solve.methods:
        raise ConfigError(f"{where}.solve.methods: give at least one method")
    if "layermerge" not in cfg.solve.methods:
        raise ConfigError(f"{where}.solve.methods: must include layermerge")
    if not cfg.solve.budgets or not all(0 < b <= 1 for b in cfg.solve.budgets):
        raise ConfigError(
            f"{where}.solve.budgets: give fractions of the base latency in (0, 1], "
            f"got {cfg.solve.budgets}"
        )
    if cfg.solve.score not in SCORE_MODES:
        raise ConfigError(f"{where}.solve.score: use one of {list(SCORE_MODES)}")
    backends = {"torch", "onnxruntime"}
    if not cfg.latency.backends or not set(cfg.latency.backends) <= backends:
        raise ConfigError(f"{where}.latency.backends: use a list from {sorted(backends)}")
    fmts = {"onnx", "pt2", "torchscript"}
    if not set(cfg.export.formats) <= fmts:
        raise ConfigError(f"{where}.export.formats: use a list from {sorted(fmts)}")
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
    for name in ("train", "importance", "finetune"):
        _check_recipe(getattr(cfg, name), f"{where}.{name}")


_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")
PROTOCOLS = ("adaptive", "reference")


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
    try:
        _recipe(section)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_smoke(smoke: Any, where: str) -> None:
    """A smoke section overrides keys of the config itself: the same names, checked here
    (their values are checked when ``--smoke`` applies them)."""
    if not isinstance(smoke, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys to their smoke values")
    bad = sorted({"smoke", "is_smoke"} & set(smoke))
    if bad:
        raise ConfigError(f"{where}: cannot override {', '.join(bad)}")
    _check_keys(smoke, CompressConfig, where)
    for name, value in smoke.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping")
            _check_keys(value, _SECTIONS[name], f"{where}.{name}")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values; mappings are merged key by key, the rest replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_smoke(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """The raw config ``data`` shrunk by its own ``smoke:`` section, marked as a smoke run.

    Everything the smoke section does not name (the model, methods, budgets, the
    fine-tuning recipe's optimiser, label smoothing, epochs, ...) stays as it is.
    """
    smoke = data.get("smoke")
    if not smoke:
        raise ConfigError(f"{where}: --smoke needs a smoke: section in the config, and it has none")
    _check_smoke(smoke, f"{where}.smoke")
    return {**_deep_merge(data, smoke), "is_smoke": True}


def apply_overrides(data: dict[str, Any], overrides, where: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` or ``SECTION.KEY=VALUE`` strings (values are YAML: ``[0.5, 0.4]``,
    ``null``, ``true``) applied to the raw config ``data``."""
    import yaml

    out = copy.deepcopy(data)
    for text in overrides:
        key, sep, raw = text.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{where} {text!r}: use KEY=VALUE or SECTION.KEY=VALUE")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} {text!r}: the value is not valid YAML ({e})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where} {text!r}: {'.'.join(parts[: i + 1])} is not a section")
        node[parts[-1]] = value
    return out


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(value: Any, where: str) -> Any:
    """``${NAME}`` in the config's strings -> the environment variable's value."""
    if isinstance(value, dict):
        return {k: expand_env(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in os.environ:
            key = where.rpartition(": ")[2]
            raise ConfigError(
                f"{where}: uses ${{{name}}}, which is not set; export {name}=... or pass "
                f"--set {key}=VALUE"
            )
        return os.environ[name]

    return _ENV.sub(sub, value)


CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with layermerge (``layermerge compress NAME``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config(name: str | Path) -> Path:
    """A config file: ``name`` itself when it exists, else the packaged config of that name."""
    path = Path(name)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if path.parent == Path(".") and (CONFIG_DIR / f"{stem}.yaml").is_file():
        return CONFIG_DIR / f"{stem}.yaml"
    raise ConfigError(
        f"config file {name} does not exist (packaged configs: {', '.join(packaged_configs())})"
    )


def read_config_data(
    path: str | Path, *, smoke: bool = False, overrides=()
) -> tuple[Path, dict[str, Any]]:
    """The raw config of ``path`` (a file or a packaged config's name) after ``--smoke``
    and ``--set``, before ``${VAR}`` expansion and validation."""
    import yaml

    path = resolve_config(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    data = data if data is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    if "is_smoke" in data:
        raise ConfigError(f"{path}.is_smoke: set by `layermerge compress --smoke`, not in a config")
    if smoke:
        data = apply_smoke(data, str(path))
    # relative weight paths written in a config are relative to the config file
    w = data.get("weights")
    if isinstance(w, str) and not _ENV.search(w) and not Path(w).expanduser().is_absolute():
        data["weights"] = str((path.parent / w).resolve())
    return path, apply_overrides(data, overrides)


def load_config(path: str | Path, *, smoke: bool = False, overrides=()) -> CompressConfig:
    """Read, shrink (``smoke``: the config's ``smoke:`` section), override (``overrides``:
    ``SECTION.KEY=VALUE`` strings), expand ``${VAR}`` and validate a config.

    ``path`` is a YAML file or the name of a packaged config (:func:`packaged_configs`).
    """
    path, data = read_config_data(path, smoke=smoke, overrides=overrides)
    is_smoke = bool(data.pop("is_smoke", False))
    where = str(path)
    data = {k: v if k == "smoke" else expand_env(v, f"{where}: {k}") for k, v in data.items()}
    if isinstance(data.get("weights"), str):
        data["weights"] = os.path.expanduser(data["weights"])
    cfg = parse_config(data, where=where)
    cfg.is_smoke = is_smoke
    return cfg


# --------------------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    report: Path
    ran: list[str]
    cached: list[str]


def _recipe(section, **extra):
    from .train import Recipe

    keys = {f.name for f in fields(Recipe)}
    d = {k: v for k, v in vars(section).items() if k in keys}
    return Recipe(**{**d, **extra})


def compress(cfg: CompressConfig, run_dir: str | Path, *, log=print) -> RunResult:
    """Run (or resume) the whole pipeline for ``cfg`` in ``run_dir``."""
    import torch

    from .data import open_dataset
    from .distributed import barrier, init, select_device
    from .export import FORMATS, export
    from .importance import build_importance_tables
    from .latency import BackendSettings, benchmark, build_latency_table, make_backend
    from .models import load_model
    from .plan import Plan
    from .report import write_report
    from .solve import InfeasibleBudgetError, solve_tables
    from .space import build_space
    from .tables import read_table
    from .tasks import ClassificationTask
    from .trace import conv_weights, trace
    from .train import evaluate, fit, load_train_net, save_state_dict
    from .transform import count_layers, merge

    # Under torchrun every rank runs this function: training, evaluation and importance
    # share their work out over the ranks, everything else runs on rank 0 (see StageRunner).
    try:
        device = select_device(cfg.device)  # training, importance and evaluation
    except RuntimeError as e:
        raise ConfigError(f"device: {e} (--set device=cpu runs on the CPU)") from None
    dist = init(device)
    main = dist.is_main
    if not main:
        log = _quiet
    run = StageRunner(run_dir, log=log, dist=dist)
    rd = run.run_dir
    if main:
        (rd / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.is_smoke:
        log("smoke run: the config's smoke: settings shrink it to a quick check")
    if dist.active:
        log(f"{dist.world} ranks: training, evaluation and importance on all of them")
    open_dataset(cfg.data)  # fail early with a clear message when the data is missing
    kwargs = dict(cfg.model_kwargs)
    shape = tuple(cfg.input_shape) if cfg.input_shape else None

    def fresh_model(weights=None):
        return load_model(cfg.model, kwargs, weights, shape)

    loaded = fresh_model()
    input_shape = loaded.input_shape
    task = ClassificationTask(label_smoothing=0.0)
    splits = task.make_data(
        cfg.data, input_shape, holdout_per_class=cfg.importance.holdout_per_class, seed=cfg.seed
    )
    structure = {"model": cfg.model, "kwargs": kwargs, "input_shape": list(input_shape)}

    # -- base weights ----------------------------------------------------------------
    def base_stage():
        if cfg.weights:
            model = fresh_model(cfg.weights).model.to(device)
            path = cfg.weights
        else:
            model = loaded.model
            train_task = ClassificationTask(label_smoothing=cfg.train.label_smoothing)
            fit(
                model,
                train_task,
                splits.train,
                _recipe(cfg.train, seed=cfg.seed),
                device=device,
                # the checkpoint is named by the settings, so changed settings start
                # afresh instead of meeting a checkpoint of another recipe
                checkpoint=rd / f"train-{digest(base_inputs)}.ckpt",
                desc="train base",
                workers=cfg.workers,
            )
            path = str(rd / "base.pt")
            if main:
                save_state_dict(model, path)
        m = evaluate(model, task, splits.test, device=device)
        return {
            "weights": path,
            "accuracy": m["accuracy"],
            "loss": m["loss"],
            "params": sum(p.numel() for p in model.parameters()),
        }

    base_inputs = {**structure, "data": cfg.data, "seed": cfg.seed}
    if cfg.weights:
        base_inputs["weights"] = file_digest(cfg.weights)
    else:
        base_inputs["train"] = cfg.section("train")
    base = run.run(
        "base", base_inputs, base_stage, outputs=[] if cfg.weights else ["base.pt"], ranks="all"
    )
    base_model = fresh_model(base["weights"]).model.eval()
    traced = trace(copy.deepcopy(base_model), input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    fingerprint = traced.chain.fingerprint()

    # -- latency tables ----------------------------------------------------------------
    lat_tables = {}
    backends = {}
    for b in cfg.latency.backends:
        providers = cfg.latency.providers if b == "onnxruntime" else None
        settings = BackendSettings(
            backend=b,
            device=cfg.latency.device,
            threads=cfg.latency.threads,
            batch_size=cfg.latency.batch_size,
            providers=tuple(providers) if providers else None,
        )
        backends[b] = make_backend(settings) if main else None  # timed on rank 0 only
        out = f"latency_{b}.csv"

        def lat_stage(b=b, out=out):
            build_latency_table(
                traced,
                rd / out,
                backends[b],
                space=space,
                timing=_timing(cfg.latency),
                model=cfg.model,
            )
            return {"table": out}

        run.run(
            f"latency:{b}",
            {"fingerprint": fingerprint, **cfg.section("latency"), "backend": b},
            lat_stage,
            outputs=[out],
        )
        lat_tables[b] = read_table(rd / out, "latency") if main else None
    primary = cfg.latency.backends[0]

    # -- importance --------------------------------------------------------------------
    imp_inputs = {"base": run.key("base"), **cfg.section("importance"), "data": cfg.data}
    # named by the settings, so that changed settings start new tables instead of
    # meeting (and being refused by) the tables of other settings
    imp_name, conv_name = (
        f"{t}-{digest(imp_inputs)}.csv" for t in ("importance", "conv_importance")
    )

    def imp_stage():
        recipe = _recipe(cfg.importance, seed=cfg.seed)
        try:
            res = build_importance_tables(
                traced,
                space,
                task,
                splits,
                rd / imp_name,
                conv_out=rd / conv_name,
                recipe=recipe,
                device=device,
                meta={"model": cfg.model},
                workers=cfg.workers,
            )
        finally:
            traced.gm.to("cpu")  # the later stages build their networks from it on the CPU
        return {"seconds": res.seconds, "base": res.base, "recipe": recipe.to_dict()}

    need_conv = "layerprune" in cfg.solve.methods
    run.run(
        "importance",
        imp_inputs,
        imp_stage,
        outputs=[imp_name] + ([conv_name] if need_conv else []),
        ranks="all",
    )
    importance = read_table(rd / imp_name, "importance") if main else None
    conv_imp = read_table(rd / conv_name, "conv_importance") if need_conv and main else None

    # -- solve -------------------------------------------------------------------------
    if main:
        (rd / "plans").mkdir(exist_ok=True)
    curves: dict[str, dict] = {}
    rows: list[dict] = []
    notes: list[str] = []
    for method in cfg.solve.methods:

        def solve_stage(method=method):
            out, curve = {}, None
            for frac in sorted(cfg.solve.budgets, reverse=True):
                try:
                    s = solve_tables(
                        lat_tables[primary],
                        importance,
                        method=method,
                        conv_importance=conv_imp,
                        budget_frac=frac,
                        score=cfg.solve.score,
                        precision=cfg.solve.precision,
                    )
                except InfeasibleBudgetError as e:
                    out[str(frac)] = {"infeasible": str(e)}
                    continue
                if curve is None:  # the largest feasible budget carries the whole curve
                    curve = {
                        "budget_ms": [float(x) for x in s.frontier.budget_ms],
                        "objective": [float(x) for x in s.frontier.objective],
                    }
                name = f"plans/{method}_{frac:g}.json"
                s.plan.save(rd / name)
                out[str(frac)] = {
                    "plan": name,
                    "predicted_ms": s.predicted_latency_ms,
                    "objective": s.objective,
                    "budget_ms": s.budget_ms,
                    "digest": digest(s.plan.to_dict()["blocks"]),
                }
            files = [v["plan"] for v in out.values() if "plan" in v]
            return {"budgets": out, "curve": curve, "files": files}

        res = run.run(
            f"solve:{method}",
            {
                "latency": run.key(f"latency:{primary}"),
                "importance": run.key("importance"),
                "method": method,
                **cfg.section("solve"),
            },
            solve_stage,
        )
        if res["curve"]:
            curves[method] = res["curve"]
        for frac in cfg.solve.budgets:
            r = res["budgets"][str(frac)]
            if "infeasible" in r:
                notes.append(f"{method} at budget {frac:g}: {r['infeasible']}")
                log(f"skipped {method} at budget {frac:g}: {r['infeasible']}")
                continue
            rows.append({"method": method, "budget_frac": frac, **r})

    # -- fine-tune, merge, export, benchmark (per distinct plan) ------------------------
    if main:
        (rd / "finetuned").mkdir(exist_ok=True)
        (rd / "export").mkdir(exist_ok=True)
    teacher = base_model if cfg.finetune.distill > 0 else None
    ft_task = ClassificationTask(
        label_smoothing=cfg.finetune.label_smoothing,
        distill_weight=cfg.finetune.distill,
        distill_temperature=cfg.finetune.distill_temperature,
    )
    base_bench: dict[str, float] = {}
    for row in rows:
        plan = Plan.load(rd / row["plan"])
        d = row["digest"]
        ft_name = f"finetuned/{d}.pt"
        ft_inputs = {"base": run.key("base"), "plan": d, **cfg.section("finetune")}
        ft_ckpt = f"finetuned/{d}-{digest(ft_inputs)}.ckpt"

        def ft_stage(plan=plan, ft_name=ft_name, ckpt=ft_ckpt):
            from .transform import compare

            net = load_train_net(traced, plan).to(device)
            before = evaluate(net, task, splits.test, device=device)["accuracy"]
            recipe = _recipe(cfg.finetune, seed=cfg.seed)
            fitted = fit(
                net,
                ft_task,
                splits.train,
                recipe,
                teacher=teacher,
                device=device,
                checkpoint=rd / ckpt,
                desc="finetune",
                workers=cfg.workers,
            )
            net.cpu()
            if main:
                save_state_dict(net, rd / ft_name)
            deploy = merge(net)  # verifies against the train-time network (raises if not)
            verified = compare(net, deploy)
            m = evaluate(deploy.to(device), task, splits.test, device=device)
            deploy.cpu()
            counts = count_layers(deploy)
            return {
                "accuracy": m["accuracy"],
                "loss": m["loss"],
                "accuracy_before": before,
                "params": sum(p.numel() for p in deploy.parameters()),
                "convs": counts["convs"],
                "activations": counts["activations"],
                "merge_max_rel_err": verified["max_rel_err"],
                # what training actually ran with (the task holds label smoothing and
                # distillation), and how many optimiser steps it took
                "recipe": recipe.to_dict(),
                "task": ft_task.settings(),
                "steps": fitted.steps,
            }

        ft = run.run(f"finetune:{d}", ft_inputs, ft_stage, outputs=[ft_name], ranks="all")
        row.update(
            accuracy=ft["accuracy"],
            accuracy_before_finetune=ft["accuracy_before"],
            merge_max_rel_err=ft.get("merge_max_rel_err"),
            params=ft["params"],
            kept_activations=len(plan.kept_activations),
            kept_convs=len(plan.kept_convs),
            merged_blocks=sum(1 for b in plan.blocks if b.length > 1),
        )

        def export_stage(plan=plan, ft_name=ft_name, d=d):
            deploy = merge(load_train_net(traced, plan, rd / ft_name))
            out = {}
            for fmt in cfg.export.formats:
                r = export(deploy, fmt, rd / "export" / f"{d}{FORMATS[fmt]}", input_shape)
                out[fmt] = {
                    "path": str(Path(r["path"]).relative_to(rd)),
                    "max_rel_err": r["max_rel_err"],
                }
            return out

        row["exports"] = run.run(
            f"export:{d}",
            {"finetune": run.key(f"finetune:{d}"), **cfg.section("export")},
            export_stage,
            outputs=[f"export/{d}{FORMATS[f]}" for f in cfg.export.formats],
        )
        row["measured_ms_by_backend"], row["speedup_by_backend"] = {}, {}
        for b in cfg.latency.backends:

            def bench_stage(plan=plan, b=b):
                # predicted latency only on the backend the plan was solved with: the
                # latency layer refuses to mix tables measured under other settings
                r = benchmark(
                    traced,
                    plan,
                    backends[b],
                    table=lat_tables[b] if b == primary else None,
                    rounds=cfg.benchmark.rounds,
                    calls_per_round=cfg.benchmark.calls_per_round,
                    max_time_s=cfg.benchmark.max_time_s,
                )
                return r.to_dict()

            r = run.run(
                f"benchmark:{d}:{b}",
                {
                    "fingerprint": fingerprint,
                    "plan": d,
                    "backend": b,
                    **cfg.section("latency"),
                    **cfg.section("benchmark"),
                },
                bench_stage,
            )
            row["measured_ms_by_backend"][b] = r["compressed_ms"]
            row["speedup_by_backend"][b] = r["speedup"]
            base_bench.setdefault(b, []).append(r["baseline_ms"])
        row["measured_ms"] = row["measured_ms_by_backend"][primary]
        row["speedup"] = row["speedup_by_backend"][primary]

    # -- report ------------------------------------------------------------------------
    import statistics

    report = {
        "model": cfg.model,
        "smoke": cfg.is_smoke,
        "data": cfg.data,
        "input_shape": list(input_shape),
        "primary_backend": primary,
        "chain_length": traced.chain.length,
        "model_fingerprint": fingerprint,
        "base": {
            "accuracy": base["accuracy"],
            "loss": base["loss"],
            "params": base["params"],
            # the baseline was timed beside every plan; its median over those runs
            "latency_ms": {b: statistics.median(v) for b, v in base_bench.items()},
        },
        "rows": rows,
        "notes": notes,
        "stages": {"ran": run.ran, "cached": run.cached},
    }
    path = rd / "report.md"
    if main:
        plans = [(f"{r['method']}@{r['budget_frac']:g}", Plan.load(rd / r["plan"])) for r in rows]
        path = write_report(rd, report, chain=traced.chain, plans=plans, curves=curves)
    barrier(dist)
    if run.ran:
        log(f"report: {path}")
    else:
        log(f"nothing to redo: every stage of {rd} is up to date; report: {path}")
    return RunResult(run_dir=rd, report=path, ran=run.ran, cached=run.cached)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _timing(lat: LatencySection):
    """The timing protocol of the latency section."""
    from .latency import TimingConfig

    if lat.protocol == "reference":
        return TimingConfig.reference(warmup_runs=lat.warmup_runs, runs=lat.runs)
    return TimingConfig(max_time_s=lat.max_time_s)


def _config_dict(cfg: CompressConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
