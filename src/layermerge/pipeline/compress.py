"""``layermerge compress CONFIG.yaml``: model -> faster model, every stage cached.

trace -> base weights (given, or trained) -> latency tables (one per backend)
-> importance tables -> solve (every method and budget) -> fine-tune, merge and
verify -> quality -> export -> benchmark -> report, in a run directory. Each
stage is recorded with the hash of everything it depends on
(:class:`~layermerge.pipeline.stages.StageRunner`): rerunning a finished run
does nothing, and changing one setting redoes only the stages that depend on
it. Identical plans chosen by different methods or budgets share one
fine-tuning. The comparison method ``channelprune`` (structured channel pruning)
gives networks instead of plans (:mod:`layermerge.pipeline.networks`), fine-tuned,
exported, timed and shipped beside them. The task (``task:`` in the config) plugs
in through :mod:`layermerge.pipeline.hooks`; under ``torchrun`` training, evaluation and
importance share their work out over the ranks, everything else runs on rank 0.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..calibration import noise_floor, spread
from ..data import open_dataset
from ..distributed import barrier, init, select_device
from ..export import FORMATS, export
from ..fileio import file_digest
from ..importance import build_importance_tables
from ..latency import (
    LATENCY_MODEL,
    BackendSettings,
    TimingConfig,
    build_latency_table,
    make_backend,
    predict_latency,
)
from ..models import load_model
from ..plan import DROP_METHODS, Plan
from ..protocols import protocol_splits
from ..report import write_report
from ..solve import InfeasibleBudgetError, solve_tables
from ..space import build_space
from ..tables import Table, read_table
from ..trace import conv_weights, trace
from ..train import evaluate, fit, save_state_dict
from ..transform import DEPLOY_VERSION, deploy_network
from .config import NETWORK_METHODS, CompressConfig, ConfigError, LatencySection
from .finetune import finetune_plan, summarize_seeds
from .hooks import hooks_for
from .networks import is_network, network_rows, network_stages, row_plan
from .objects import ObjectSource, load_data_factory, make_splits_of
from .pool import time_pool
from .run import Run, RunResult
from .ship import ship
from .stages import SIDECARS, StageRunner, digest


def compress(
    cfg: CompressConfig,
    run_dir: str | Path,
    *,
    log=print,
    wait: bool | float = False,
    source: ObjectSource | None = None,
) -> RunResult:
    """Run (or resume) the whole pipeline for ``cfg`` in ``run_dir``. One run at a time
    per run directory: when another process runs in it, ``wait=False`` refuses at once
    (:class:`~layermerge.pipeline.stages.RunDirBusyError`), ``True`` waits for it, a
    number waits at most that many seconds. ``source``: the model and data as Python
    objects (:func:`layermerge.compress` makes it); a config whose ``data`` is
    ``python:file.py:factory`` makes its own from the factory's datasets."""
    if source is None and cfg.data.startswith("python:"):
        splits = make_splits_of(load_data_factory(cfg.data), seed=cfg.seed)
        # the datasets' digest in the stage keys: other data redoes what depends on it
        cfg = dataclasses.replace(cfg, data=f"{cfg.data}@{splits.digest()}")
        source = ObjectSource(splits)
    run = _start(cfg, run_dir, log, wait, source)
    try:
        return _stages(run)
    finally:
        run.runner.close()


def _stages(run: Run) -> RunResult:
    _base_stage(run)
    _latency_stages(run)
    _importance_stage(run)
    rows, curves, notes = _solve_stages(run)
    net_rows, net_notes = network_rows(run)  # the comparison methods of networks
    rows, notes = rows + net_rows, notes + net_notes
    if run.main:
        for sub in ("finetuned", "export"):
            (run.rd / sub).mkdir(exist_ok=True)
    run.hooks.prepare_quality(run)
    base_quality = run.hooks.quality_stage(
        run, "base", run.runner.key("base"), lambda: copy.deepcopy(run.base_model).eval()
    )
    run.base.update({k: v for k, v in base_quality.items() if k != "files"})
    for row in rows:
        (network_stages if is_network(row) else _plan_stages)(run, row)
    # every latency of the report: one interleaved pool per backend
    run.pool = time_pool(run, rows)
    if run.main:
        for row in rows:
            row["files"] = ship(run, row, row_plan(run, row))
    path = _report(run, rows, curves, notes)
    barrier(run.dist)
    if run.runner.ran:
        run.log(f"report: {path}")
    else:
        run.log(f"nothing to redo: every stage of {run.rd} is up to date; report: {path}")
    return RunResult(run_dir=run.rd, report=path, ran=run.runner.ran, cached=run.runner.cached)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _start(
    cfg: CompressConfig,
    run_dir: str | Path,
    log,
    wait: bool | float = False,
    source: ObjectSource | None = None,
) -> Run:
    try:
        device = select_device(cfg.device)  # training, importance and evaluation
    except RuntimeError as e:
        raise ConfigError(f"device: {e} (--set device=cpu runs on the CPU)") from None
    if cfg.train is None and not cfg.weights:
        raise ConfigError(
            "this config has no train: section, so the base network must come from weights: "
            "set weights: PATH (a state dict or .safetensors of the model), e.g. --set "
            "weights=PATH"
        )
    dist = init(device)
    if not dist.is_main:
        log = _quiet
    runner = StageRunner(run_dir, log=log, dist=dist, wait=wait)
    try:
        if dist.is_main:
            (runner.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.is_smoke:
            log("smoke run: the config's smoke: settings shrink it to a quick check")
        if dist.active:
            log(f"{dist.world} ranks: training, evaluation and importance on all of them")
        if source is not None:
            return source.make_run(cfg, runner, device, dist, log)
        open_dataset(cfg.data)  # fail early with a clear message when the data is missing
        hooks = hooks_for(cfg)
        shape = tuple(cfg.input_shape) if cfg.input_shape else None
        loaded = load_model(cfg.model, dict(cfg.model_kwargs), None, shape)
        task = hooks.task()
        norm = normalization(cfg, loaded.preprocessing)
        splits = task.make_data(
            cfg.data,
            loaded.input_shape,
            # the importance protocol redraws the holdouts at its size (protocol_splits)
            holdout_per_class=cfg.importance.holdout_per_class or 50,
            seed=cfg.seed,
            **({"normalization": (norm["mean"], norm["std"])} if norm else {}),
        )
        run = Run(cfg, hooks, runner, device, dist, log, tuple(loaded.input_shape), task, splits)
        run.normalization = norm
    except BaseException:
        runner.close()  # the next run may start
        raise
    run.base_model = loaded.model  # trained in place by the base stage
    return run


# --------------------------------------------------------------------------- stages


def normalization(cfg: CompressConfig, preprocessing: dict | None) -> dict | None:
    """The mean and std the inputs are normalised with, and where they come from: the
    config's ``normalize``, else a timm model's ``pretrained_cfg``; ``None``: the
    dataset's own statistics. Classification only."""
    if cfg.task != "classification":
        return None
    if cfg.normalize is not None:
        return {**cfg.normalize, "from": "config"}
    if preprocessing and "mean" in preprocessing and "std" in preprocessing:
        return {
            "mean": list(preprocessing["mean"]),
            "std": list(preprocessing["std"]),
            "from": "the model's pretrained_cfg",
        }
    return None


def _base_stage(run: Run) -> None:
    """The base network: given weights, or trained from the model's initialisation."""
    cfg, rd = run.cfg, run.rd
    inputs: dict[str, Any] = {
        "model": cfg.model,
        "kwargs": dict(cfg.model_kwargs),
        "input_shape": list(run.input_shape),
        "data": cfg.data,
        "seed": cfg.seed,
    }
    if cfg.task != "classification":
        inputs["task"] = run.task.settings()
    if run.normalization is not None:
        inputs["normalization"] = run.normalization
    if cfg.weights:
        inputs["weights"] = file_digest(cfg.weights)
    else:
        inputs["train"] = cfg.section("train")

    def stage():
        if cfg.weights:
            model = run.fresh_model(cfg.weights).to(run.device)
        else:
            model = run.base_model
            fit(
                model,
                run.hooks.train_task(),
                run.splits.train,
                cfg.recipe("train"),
                device=run.device,
                # the checkpoint is named by the settings, so changed settings start
                # afresh instead of meeting a checkpoint of another recipe
                checkpoint=rd / f"train-{digest(inputs)}.ckpt",
                desc="train base",
                workers=cfg.workers,
            )
        if run.main:  # the run directory keeps its base weights (given ones copied in)
            save_state_dict(model, rd / "base.pt")
        m = evaluate(model, run.task, run.hooks.eval_split(run), device=run.device)
        model.cpu()
        return {
            "weights": "base.pt",  # relative to the run directory
            **run.hooks.quality_of(m),
            "params": sum(p.numel() for p in model.parameters()),
        }

    run.base = dict(run.runner.run("base", inputs, stage, outputs=["base.pt"], ranks="all"))
    run.base_model = run.fresh_model(rd / "base.pt").eval()
    run.traced = trace(copy.deepcopy(run.base_model), run.input_shape)
    run.space = build_space(run.traced.chain, conv_weights(run.traced))


def _family_version(run: Run) -> dict[str, Any]:
    """The model family's version where it has one (a diffusers UNet's: how its plans
    are applied and timed), for the keys of the stages that depend on it."""
    version = getattr(run.traced.family, "version", None)
    return {} if version is None else {"family_version": version}


def timing_config(lat: LatencySection) -> TimingConfig:
    """The timing protocol of the latency section."""
    if lat.protocol == "reference":
        return TimingConfig.reference(warmup_runs=lat.warmup_runs, runs=lat.runs)
    return TimingConfig(max_time_s=lat.max_time_s)


def _latency_stages(run: Run) -> None:
    """One latency table per backend, timed on rank 0."""
    cfg, lat = run.cfg, run.cfg.latency
    for b in lat.backends:
        providers = lat.providers if b == "onnxruntime" else None
        settings = BackendSettings(
            backend=b,
            device=lat.device,
            threads=lat.threads,
            batch_size=lat.batch_size,
            providers=tuple(providers) if providers else None,
        )
        run.backends[b] = make_backend(settings) if run.main else None
        out = f"latency_{b}.csv"
        name = f"latency:{b}"
        inputs = {
            "fingerprint": run.traced.fingerprint,
            **cfg.section("latency"),
            "backend": b,
            # tables of an older latency model are measured again, not served
            "latency_model": LATENCY_MODEL,
            **_family_version(run),
        }
        # a finished table of other settings (another batch size, ...) is measured
        # anew, not resumed (which the table would refuse)
        rec = run.runner.state.get(name)
        other = rec is not None and rec["key"] != digest({"stage": name, "inputs": inputs})

        def stage(b=b, out=out, other=other):
            if other and run.main:
                for f in (out, *(out + s for s in SIDECARS)):
                    (run.rd / f).unlink(missing_ok=True)
            build_latency_table(
                run.traced,
                run.rd / out,
                run.backends[b],
                space=run.space,
                timing=timing_config(lat),
                model=cfg.model,
            )
            return {"table": out}

        run.runner.run(name, inputs, stage, outputs=[out])
        run.tables[b] = read_table(run.rd / out, "latency") if run.main else None


def _importance_stage(run: Run) -> None:
    cfg = run.cfg
    inputs = {"base": run.runner.key("base"), **cfg.section("importance"), "data": cfg.data}
    if cfg.task != "classification":
        inputs["task"] = run.task.settings()
    inputs.update(_family_version(run))
    # named by the settings, so that changed settings start new tables instead of
    # meeting (and being refused by) the tables of other settings
    imp_name, conv_name = (f"{t}-{digest(inputs)}.csv" for t in ("importance", "conv_importance"))
    need_conv = any(m in cfg.solve.methods for m in DROP_METHODS)

    def stage():
        protocol, recipe = cfg.importance.resolve(cfg.seed)
        try:
            res = build_importance_tables(
                run.traced,
                run.space,
                run.task,
                run.splits,
                run.rd / imp_name,
                conv_out=run.rd / conv_name if need_conv else False,
                protocol=protocol,
                recipe=recipe,
                seed=cfg.seed,
                device=run.device,
                meta={"model": cfg.model},
                workers=cfg.workers,
            )
        finally:
            run.traced.model.to("cpu")  # later stages build their networks from it on the CPU
        return {
            "seconds": res.seconds,
            "base": res.base,
            "protocol": protocol.name,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "bn_batches": protocol.bn_batches,
            "score": res.score,
            "calibration": res.calibration,
            "noise_floor": res.noise_floor,
            "within_noise": res.within_noise,
        }

    outputs = [imp_name] + ([conv_name] if need_conv else [])
    run.runner.run("importance", inputs, stage, outputs=outputs, ranks="all")
    if run.main:
        run.importance = read_table(run.rd / imp_name, "importance")
        if need_conv:
            run.conv_importance = read_table(run.rd / conv_name, "conv_importance")


def _solve_stages(run: Run) -> tuple[list[dict], dict[str, dict], list[str]]:
    """Every method at every budget (on the primary backend's table): the rows of the
    report, the solvers' trade-off curves and notes on infeasible budgets."""
    cfg, rd = run.cfg, run.rd
    if run.main:
        (rd / "plans").mkdir(exist_ok=True)
    curves: dict[str, dict] = {}
    rows: list[dict] = []
    notes: list[str] = []
    table = run.tables[run.primary]
    for method in [m for m in cfg.solve.methods if m not in NETWORK_METHODS]:

        def stage(method=method):
            base_ms = predict_latency(table, run.space.identity_plan())
            out, curve = {}, None
            for frac in sorted(cfg.solve.budgets, reverse=True):
                try:
                    s = solve_tables(
                        table,
                        run.importance,
                        method=method,
                        conv_importance=run.conv_importance,
                        score=cfg.solve.score,
                        precision=cfg.solve.precision,
                        **run.hooks.budget(table, base_ms, frac),
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
                if cfg.solve.rerank > 1:
                    out[str(frac)]["candidates"] = _save_candidates(
                        rd, f"plans/{method}_{frac:g}", s.top_plans(cfg.solve.rerank)
                    )
            files = [v["plan"] for v in out.values() if "plan" in v]
            files += [c["plan"] for v in out.values() for c in v.get("candidates", [])]
            return {"budgets": out, "curve": curve, "files": sorted(set(files))}

        solve_keys = {k: v for k, v in cfg.section("solve").items() if k != "rerank_steps"}
        if cfg.solve.rerank <= 1:  # off: the stage keys of runs without re-ranking
            solve_keys.pop("rerank", None)
        inputs = {
            "latency": run.runner.key(f"latency:{run.primary}"),
            "importance": run.runner.key("importance"),
            "method": method,
            **solve_keys,
            "deploy": DEPLOY_VERSION,  # how a plan's blocks are priced
        }
        if cfg.task != "classification":
            inputs["budgets_of"] = cfg.task
        res = run.runner.run(f"solve:{method}", inputs, stage)
        if res["curve"]:
            curves[method] = res["curve"]
        for frac in cfg.solve.budgets:
            r = res["budgets"][str(frac)]
            if "infeasible" in r:
                notes.append(f"{method} at budget {frac:g}: {r['infeasible']}")
                run.log(f"skipped {method} at budget {frac:g}: {r['infeasible']}")
                continue
            row = {"method": method, "budget_frac": frac, **r}
            if r.get("candidates"):
                _rerank_stage(run, row)
            rows.append(row)
    return rows, curves, notes


def _save_candidates(rd: Path, stem: str, plans: list[Plan]) -> list[dict[str, Any]]:
    """The re-ranking candidates of one budget as plan files, best objective first."""
    out = []
    for i, p in enumerate(plans):
        name = f"{stem}_c{i}.json"
        p.save(rd / name)
        out.append(
            {
                "plan": name,
                "digest": digest(p.to_dict()["blocks"]),
                "objective": p.meta["objective"],
                "predicted_ms": p.meta["predicted_latency_ms"],
            }
        )
    return out


def _rerank_stage(run: Run, row: dict[str, Any]) -> None:
    """Re-rank the solver's candidate plans of ``row`` (the best Pareto-optimal plans
    within its budget): fine-tune each whole plan for ``solve.rerank_steps`` steps with
    the fine-tune recipe and seed on the importance table's holdout-train split, score
    it on its holdout-val split (disjoint from it; never the test split) and make the
    best the row's plan. Records ``row["rerank"]``."""
    cfg, hooks = run.cfg, run.hooks
    cands = row.pop("candidates")
    metric = hooks.metrics[0]["key"]
    lower = metric.endswith("loss")  # a loss: lower is better
    section = {key: v for key, v in cfg.section("finetune").items() if key != "seeds"}
    inputs = {
        "base": run.runner.key("base"),
        "candidates": [c["digest"] for c in cands],
        "finetune": section,
        "steps": cfg.solve.rerank_steps,
        "metric": metric,
        "split": "holdout-val",
        "trained_on": "holdout-train",
        "data": cfg.data,
        # the holdout split the importance table is scored on
        "importance": run.runner.key("importance"),
    }
    if cfg.task != "classification":
        inputs["task"] = hooks.finetune_task().settings()

    def stage():
        t0 = time.time()
        # the importance table's holdout splits: fine-tuned on holdout-train, scored on
        # the disjoint holdout-val (the whole training split would contain holdout-val)
        holdout = protocol_splits(run.splits, cfg.importance.resolve(cfg.seed)[0])
        scores = []
        for i, c in enumerate(cands):
            res = finetune_plan(
                run.traced,
                Plan.load(run.rd / c["plan"]),
                hooks.finetune_task(),
                holdout.holdout_train,
                cfg.recipe("finetune", steps=cfg.solve.rerank_steps),
                teacher=run.base_model if cfg.finetune.distill > 0 else None,
                eval_split=holdout.holdout_val,
                eval_task=run.task,
                device=run.device,
                progress=False,
                desc=f"rerank {i + 1}/{len(cands)}",
                workers=cfg.workers,
            )
            scores.append(float(hooks.quality_of(res.after)[metric]))
        best = (min if lower else max)(range(len(cands)), key=scores.__getitem__)
        return {"scores": scores, "chosen": best, "seconds": time.time() - t0}

    tag = f"rerank:{row['method']}:{row['budget_frac']:g}"
    if len(cands) == 1:  # the budget leaves one plan: nothing to compare, no fine-tune
        res = {"scores": [None], "chosen": 0, "seconds": 0.0}
    else:
        res = run.runner.run(tag, inputs, stage, ranks="all")
    chosen = cands[res["chosen"]]
    row["rerank"] = {
        "k": cfg.solve.rerank,
        "steps": cfg.solve.rerank_steps,
        "metric": metric,
        "split": "holdout-val",
        "candidates": [{**c, "score": sc} for c, sc in zip(cands, res["scores"])],
        "chosen": res["chosen"],
        "differs": chosen["digest"] != row["digest"],
        "dp_objective": row["objective"],
        "seconds": res["seconds"],
    }
    row.update({k: chosen[k] for k in ("plan", "digest", "objective", "predicted_ms")})


def _finetune_seed(run: Run, row: dict[str, Any], plan: Plan, k: int) -> dict[str, Any]:
    """Fine-tune the plan of ``row`` with the run's seed + ``k`` and score it (a stage
    per seed; seed 0's is the stage a run without ``finetune.seeds`` makes)."""
    cfg, rd, hooks = run.cfg, run.rd, run.hooks
    d = row["digest"]
    tag = d if k == 0 else f"{d}-s{k}"
    ft_name = f"finetuned/{tag}.pt"
    section = {key: v for key, v in cfg.section("finetune").items() if key != "seeds"}
    ft_inputs = {"base": run.runner.key("base"), "plan": d, **section}
    if k:
        ft_inputs["seed_offset"] = k
    if cfg.task != "classification":
        ft_inputs["task"] = hooks.finetune_task().settings()

    def ft_stage():
        ft_task = hooks.finetune_task()
        res = finetune_plan(
            run.traced,
            plan,
            ft_task,
            run.splits.train,
            cfg.recipe("finetune", seed=cfg.seed + k),
            teacher=run.base_model if cfg.finetune.distill > 0 else None,
            eval_split=hooks.eval_split(run),
            eval_task=run.task,
            evaluate_before=hooks.score_before,
            out=rd / ft_name,
            device=run.device,
            checkpoint=rd / f"finetuned/{tag}-{digest(ft_inputs)}.ckpt",
            desc="finetune" + (f" seed +{k}" if k else ""),
            workers=cfg.workers,
        )
        before = hooks.quality_of(res.before) if res.before else {}
        return {
            **hooks.quality_of(res.after),
            **{f"{key}_before": v for key, v in before.items()},
            "params": res.params,
            "convs": res.layers["convs"],
            "activations": res.layers["activations"],
            "merge_max_rel_err": res.merge_max_rel_err,
            # what training actually ran with (the task holds label smoothing and
            # distillation), and how many optimiser steps it took
            "recipe": res.recipe.to_dict(),
            "task": ft_task.settings(),
            "steps": res.steps,
        }

    stage = f"finetune:{tag}" if k == 0 else f"finetune:{d}:seed+{k}"
    ft = run.runner.run(stage, ft_inputs, ft_stage, outputs=[ft_name], ranks="all")
    ft_key = run.runner.key(stage)
    quality: dict[str, Any] = {}
    for key in ft:
        if key.endswith("_before"):
            quality[key.removesuffix("_before") + "_before_finetune"] = ft[key]
    for spec in hooks.metrics:
        if spec["key"] in ft:
            quality[spec["key"]] = ft[spec["key"]]
    extra = hooks.quality_stage(
        run, tag, ft_key, lambda: deploy_network(run.traced, plan, rd / ft_name)
    )
    quality.update({key: v for key, v in extra.items() if key != "files"})
    return {"ft": ft, "key": ft_key, "file": ft_name, "quality": quality, "seed": cfg.seed + k}


def _plan_stages(run: Run, row: dict[str, Any]) -> None:
    """Fine-tune (``finetune.seeds`` times), score and export the plan of ``row``
    (stages per distinct plan, shared by the rows with the same plan). The row's
    quality is the mean over the seeds, with its SD; the exported network is the
    seed of median quality."""
    cfg, rd, hooks = run.cfg, run.rd, run.hooks
    plan = Plan.load(rd / row["plan"])
    d = row["digest"]
    seeds = [_finetune_seed(run, row, plan, k) for k in range(cfg.finetune.seeds)]
    fields, chosen = summarize_seeds(hooks.metrics, seeds)
    ft, ft_key, ft_name = chosen["ft"], chosen["key"], chosen["file"]
    errs = [
        s["ft"]["merge_max_rel_err"]
        for s in seeds
        if s["ft"].get("merge_max_rel_err") is not None  # 0.0: exact (nothing merged)
    ]
    row.update(
        **fields,
        merge_max_rel_err=max(errs) if errs else None,
        params=ft["params"],
        convs=ft.get("convs"),
        activations=ft.get("activations"),
        kept_activations=len(plan.kept_activations),
        kept_convs=len(plan.kept_convs),
        merged_blocks=sum(1 for b in plan.blocks if b.length > 1),
        **plan_structure(run.traced.chain, plan),
    )

    def export_stage():
        # with all the model's inputs (a UNet's sample and timestep)
        deployed = deploy_network(run.traced, plan, rd / ft_name)
        net = run.traced.family.export_module(deployed)
        out = {}
        for fmt in cfg.export.formats:
            r = export(net, fmt, rd / "export" / f"{d}{FORMATS[fmt]}", run.input_shape)
            out[fmt] = {
                "path": str(Path(r["path"]).relative_to(rd)),
                "max_rel_err": r["max_rel_err"],
            }
        if run.main:
            save_state_dict(deployed, rd / "export" / f"{d}.safetensors")
        out["weights"] = {"path": f"export/{d}.safetensors"}
        return out

    row["exports"] = run.runner.run(
        f"export:{d}",
        # "inputs": the network with all the model's inputs, and its weights beside it
        {
            "finetune": ft_key,
            **cfg.section("export"),
            "inputs": "all+weights",
            "deploy": DEPLOY_VERSION,
        },
        export_stage,
        outputs=[f"export/{d}{FORMATS[f]}" for f in cfg.export.formats]
        + [f"export/{d}.safetensors"],
    )


def plan_structure(chain, plan: Plan) -> dict[str, int]:
    """What a plan does to the chain: ``merged_spans`` (blocks that merge two or more
    kept convs into one), ``pruned_convs`` (convs replaced by identity, the
    up-sampling convs a UNet may drop excepted) and ``dropped_upsampling_convs``
    (convs that the model family lets a plan drop on their own, ``allow_empty``: a
    UNet's up-sampling convs)."""
    kept = set(plan.kept_convs)
    removed = [c for c in chain.convs if c.index not in kept]
    return {
        "merged_spans": sum(1 for b in plan.blocks if len(b.kept_convs) > 1),
        "pruned_convs": sum(1 for c in removed if not c.allow_empty),
        "dropped_upsampling_convs": sum(1 for c in removed if c.allow_empty),
    }


def _importance_summary(table: Table | None) -> dict[str, Any] | None:
    """The importance table's protocol, score, and noise floor (the SD of its
    identity-plan entries) beside the spread of its options' scores."""
    if table is None:
        return None
    meta, score = table.meta, table.meta.get("score")
    summary = meta.get("calibration") or {}
    floor = noise_floor(summary, score) if score else None
    sd = spread(table.rows, score) if score else None
    return {
        "protocol": meta.get("protocol"),
        "score": score,
        "calibration_seeds": summary.get("seeds", 0),
        "noise_floor": floor,
        "spread": sd,
        "within_noise": floor is not None and sd is not None and sd <= 2 * floor,
        "entries": len(table.rows),
    }


def _report(run: Run, rows: list[dict], curves: dict, notes: list[str]) -> Path:
    cfg = run.cfg
    table = run.tables[run.primary]
    base = {k: v for k, v in run.base.items() if k != "weights"}
    # timed in the pool, beside every plan
    base["latency_ms"] = {b: pool["base_ms"] for b, pool in run.pool.items()}
    if run.normalization is not None:
        base["normalization"] = run.normalization
    if table is not None:
        base["predicted_ms"] = predict_latency(table, run.space.identity_plan())
        base["constant_ms"] = table.constant_ms
    report = {
        "model": cfg.model,
        "task": cfg.task,
        "smoke": cfg.is_smoke,
        "data": cfg.data,
        "input_shape": list(run.input_shape),
        "primary_backend": run.primary,
        "chain_length": run.traced.chain.length,
        "model_fingerprint": run.traced.fingerprint,
        "budgets_are": run.hooks.budgets_are,
        "metrics": [dict(m) for m in run.hooks.metrics],
        "base": base,
        "importance": _importance_summary(run.importance),
        "timing_pool": run.pool,
        "rows": rows,
        "notes": notes,
        "stages": {"ran": run.runner.ran, "cached": run.runner.cached},
    }
    path = run.rd / "report.md"
    if run.main:
        run.hooks.report_extras(run, report)
        plans = [
            (f"{r['method']}@{r['budget_frac']:g}", Plan.load(run.rd / r["plan"]))
            for r in rows
            if not is_network(r)
        ]
        path = write_report(run.rd, report, chain=run.traced.chain, plans=plans, curves=curves)
    return path
