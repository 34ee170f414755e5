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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

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
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class LatencySection:
    backends: list[str] = field(default_factory=lambda: ["onnxruntime", "torch"])
    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    max_time_s: float = 0.5


@dataclass
class ImportanceSection:
    holdout_per_class: int = 50
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 256
    lr: float = 0.1


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
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    distill: float = 0.0  # weight of the distillation loss from the uncompressed network
    distill_temperature: float = 4.0


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
    device: str = "cpu"
    threads: int | None = None  # torch threads for training and evaluation (default: torch's)
    train: TrainSection = field(default_factory=TrainSection)
    latency: LatencySection = field(default_factory=LatencySection)
    importance: ImportanceSection = field(default_factory=ImportanceSection)
    solve: SolveSection = field(default_factory=SolveSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    export: ExportSection = field(default_factory=ExportSection)
    benchmark: BenchmarkSection = field(default_factory=BenchmarkSection)

    def section(self, name: str) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(getattr(self, name))


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


def load_config(path: str | Path) -> CompressConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    cfg = parse_config(data or {}, where=str(path))
    # relative paths in a config are relative to the config file
    if cfg.weights is not None and not Path(cfg.weights).is_absolute():
        cfg.weights = str((path.parent / cfg.weights).resolve())
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

    run = StageRunner(run_dir, log=log)
    rd = run.run_dir
    (rd / "config.json").write_text(json.dumps(_config_dict(cfg), indent=2) + "\n")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
            model = fresh_model(cfg.weights).model
            path = cfg.weights
        else:
            model = loaded.model
            train_task = ClassificationTask(label_smoothing=cfg.train.label_smoothing)
            fit(
                model,
                train_task,
                splits.train,
                _recipe(cfg.train, seed=cfg.seed),
                # the checkpoint is named by the settings, so changed settings start
                # afresh instead of meeting a checkpoint of another recipe
                checkpoint=rd / f"train-{digest(base_inputs)}.ckpt",
                desc="train base",
            )
            path = str(save_state_dict(model, rd / "base.pt"))
        m = evaluate(model, task, splits.test)
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
    base = run.run("base", base_inputs, base_stage, outputs=[] if cfg.weights else ["base.pt"])
    base_model = fresh_model(base["weights"]).model.eval()
    traced = trace(copy.deepcopy(base_model), input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    fingerprint = traced.chain.fingerprint()

    # -- latency tables ----------------------------------------------------------------
    lat_tables = {}
    backends = {}
    for b in cfg.latency.backends:
        settings = BackendSettings(
            backend=b,
            device=cfg.latency.device,
            threads=cfg.latency.threads,
            batch_size=cfg.latency.batch_size,
        )
        backends[b] = make_backend(settings)
        out = f"latency_{b}.csv"

        def lat_stage(b=b, out=out):
            from .latency import TimingConfig

            build_latency_table(
                traced,
                rd / out,
                backends[b],
                space=space,
                timing=TimingConfig(max_time_s=cfg.latency.max_time_s),
                model=cfg.model,
            )
            return {"table": out}

        run.run(
            f"latency:{b}",
            {"fingerprint": fingerprint, **cfg.section("latency"), "backend": b},
            lat_stage,
            outputs=[out],
        )
        lat_tables[b] = read_table(rd / out, "latency")
    primary = cfg.latency.backends[0]

    # -- importance --------------------------------------------------------------------
    def imp_stage():
        recipe = _recipe(cfg.importance, seed=cfg.seed)
        res = build_importance_tables(
            traced,
            space,
            task,
            splits,
            rd / "importance.csv",
            conv_out=rd / "conv_importance.csv",
            recipe=recipe,
            meta={"model": cfg.model},
        )
        return {"seconds": res.seconds, "base": res.base}

    need_conv = "layerprune" in cfg.solve.methods
    run.run(
        "importance",
        {"base": run.key("base"), **cfg.section("importance"), "data": cfg.data},
        imp_stage,
        outputs=["importance.csv"] + (["conv_importance.csv"] if need_conv else []),
    )
    importance = read_table(rd / "importance.csv", "importance")
    conv_imp = read_table(rd / "conv_importance.csv", "conv_importance") if need_conv else None

    # -- solve -------------------------------------------------------------------------
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
            net = load_train_net(traced, plan)
            before = evaluate(net, task, splits.test)["accuracy"]
            fit(
                net,
                ft_task,
                splits.train,
                _recipe(cfg.finetune, seed=cfg.seed),
                teacher=teacher,
                checkpoint=rd / ckpt,
                desc="finetune",
            )
            save_state_dict(net, rd / ft_name)
            deploy = merge(net)  # verifies against the train-time network
            m = evaluate(deploy, task, splits.test)
            counts = count_layers(deploy)
            return {
                "accuracy": m["accuracy"],
                "loss": m["loss"],
                "accuracy_before": before,
                "params": sum(p.numel() for p in deploy.parameters()),
                "convs": counts["convs"],
                "activations": counts["activations"],
            }

        ft = run.run(
            f"finetune:{d}",
            ft_inputs,
            ft_stage,
            outputs=[ft_name],
        )
        row.update(
            accuracy=ft["accuracy"],
            accuracy_before_finetune=ft["accuracy_before"],
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
    plans = [(f"{r['method']}@{r['budget_frac']:g}", Plan.load(rd / r["plan"])) for r in rows]
    path = write_report(rd, report, chain=traced.chain, plans=plans, curves=curves)
    if run.ran:
        log(f"report: {path}")
    else:
        log(f"nothing to redo: every stage of {rd} is up to date; report: {path}")
    return RunResult(run_dir=rd, report=path, ran=run.ran, cached=run.cached)


def _config_dict(cfg: CompressConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
