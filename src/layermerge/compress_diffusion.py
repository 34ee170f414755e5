"""``layermerge compress CONFIG.yaml`` for diffusion UNets (a config with
``task: diffusion``): UNet -> latency tables -> importance table -> LayerMerge plans
at several budgets -> fine-tuned, merged, verified UNets -> FID and measured
forward and sampling speed-ups -> report.

The stages and their caching are those of the classification pipeline
(:class:`~layermerge.stages.StageRunner`: a rerun redoes only what changed, and
the long stages resume inside themselves). What differs is the task
(:class:`~layermerge.diffusion.DiffusionTask`: denoising loss, importance
``exp(-loss ratio)``, EMA fine-tuning), the quality metric (FID of DDIM samples,
in the feature space the report names) and the budgets, which follow the paper's
DDPM convention: a fraction of the *table latency* (the chain's entries of the
unmodified UNet), the constant rest of the network on top.

Configs: ``configs/ddpm-fashion-mnist.yaml`` (runs on a CPU) and
``configs/ddpm-cifar10.yaml`` (the paper's recipe, for GPUs).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from .stages import StageRunner, file_digest

DEFAULTS: dict[str, Any] = {
    "task": "diffusion",
    "model": "diffusers:ddpm-small",
    "model_kwargs": {},
    "weights": None,
    "data": "fashion-mnist",
    "input_shape": [1, 32, 32],
    "seed": 0,
    "device": "cpu",
    "threads": None,
    "schedule": {
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",
    },
    "train": {
        "steps": 700,
        "batch_size": 32,
        "lr": 1e-3,
        "ema_decay": 0.995,
        "warmup_epochs": 0.02,
        "grad_clip": 1.0,
    },
    "latency": {
        "backends": ["onnxruntime", "torch"],
        "device": "cpu",
        "providers": None,
        "threads": 1,
        "batch_size": 1,
        "max_time_s": 0.3,
    },
    "importance": {
        "holdout_per_class": 10,
        "steps": 5,
        "batch_size": 32,
        "lr": 1e-4,
        "eval_draws": 2,
        "reinit": "none",
    },
    "solve": {"budgets": [0.85, 0.7], "precision": 1000},
    "finetune": {
        "steps": 150,
        "batch_size": 32,
        "lr": 2e-4,
        "ema_decay": 0.99,
        "distill": 0.5,
        "warmup_epochs": 0.0,
        "grad_clip": 1.0,
    },
    "quality": {
        "n": 200,
        "steps": 25,
        "batch_size": 100,
        "classifier": "layermerge:resnet20",
        "classifier_kwargs": {"in_chans": 1},
        "classifier_weights": None,
        "classifier_steps": 300,
        "features": "classifier",
        "inception_weights": None,
    },
    "benchmark": {"sampling_steps": 100, "rounds": 2, "forward_rounds": 6},
    "export": {"formats": ["onnx"]},
}


class DiffusionConfigError(ValueError):
    """The diffusion compress config is not valid."""


def parse_diffusion_config(data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """``data`` merged over :data:`DEFAULTS`; unknown keys and bad values are refused."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg["is_smoke"] = bool(data.get("is_smoke", False))
    for k, v in data.items():
        if k == "is_smoke":
            continue
        if k not in DEFAULTS:
            raise DiffusionConfigError(
                f"{where}: unknown key {k!r} (known: {', '.join(sorted(DEFAULTS))})"
            )
        if k == "train" and v is None:
            cfg[k] = None  # the base UNet must come from weights
            continue
        if isinstance(DEFAULTS[k], dict) and k != "model_kwargs":
            if not isinstance(v, dict):
                raise DiffusionConfigError(f"{where}: {k} must be a mapping")
            unknown = set(v) - set(DEFAULTS[k])
            if unknown:
                raise DiffusionConfigError(
                    f"{where}: unknown key(s) {sorted(unknown)} in {k} (known: "
                    f"{', '.join(sorted(DEFAULTS[k]))})"
                )
            cfg[k].update(v)
        else:
            cfg[k] = v
    if cfg["task"] != "diffusion":
        raise DiffusionConfigError(f"{where}: task must be 'diffusion'")
    budgets = cfg["solve"]["budgets"]
    if not budgets or not all(isinstance(b, (int, float)) and 0 < b < 1 for b in budgets):
        raise DiffusionConfigError(f"{where}: solve.budgets must be fractions in (0, 1)")
    if len(cfg["input_shape"]) != 3:
        raise DiffusionConfigError(f"{where}: input_shape must be [C, H, W]")
    if not cfg["latency"]["backends"]:
        raise DiffusionConfigError(f"{where}: latency.backends must name at least one backend")
    return cfg


def is_diffusion_config(path: str | Path) -> bool:
    """Whether the config file (or packaged config name) has ``task: diffusion``."""
    import yaml

    from .compress import resolve_config

    try:
        data = yaml.safe_load(resolve_config(path).read_text())
    except Exception:
        return False  # the classification loader reports what is wrong
    return isinstance(data, dict) and data.get("task") == "diffusion"


def load_diffusion_config(path: str | Path, *, smoke: bool = False, overrides=()) -> dict[str, Any]:
    """Read a ``task: diffusion`` config: its ``smoke:`` section applied with ``smoke``,
    then ``--set`` overrides, then validated. Relative ``weights`` paths are relative
    to the config file."""
    import yaml

    from .compress import _deep_merge, apply_overrides, resolve_config

    path = resolve_config(path)
    data = yaml.safe_load(path.read_text()) or {}
    smoke_section = data.pop("smoke", None)
    if smoke:
        if not smoke_section:
            raise DiffusionConfigError(f"{path}: --smoke needs a smoke: section")
        data = _deep_merge(data, smoke_section)
    data = apply_overrides(data, overrides)
    w = data.get("weights")
    if isinstance(w, str) and not Path(w).expanduser().is_absolute():
        data["weights"] = str((path.parent / w).resolve())
    cfg = parse_diffusion_config(data, where=str(path))
    cfg["is_smoke"] = smoke
    return cfg


def _backend(name: str, lat: dict[str, Any]):
    from .latency import make_backend

    kw: dict[str, Any] = {"device": lat["device"]}
    if lat["providers"] and name == "onnxruntime":
        kw["providers"] = lat["providers"]
    return make_backend(
        backend=name, threads=int(lat["threads"]), batch_size=int(lat["batch_size"]), **kw
    )


def _recipe(section: dict[str, Any], seed: int, **extra):
    from .train import Recipe

    return Recipe(
        steps=int(section["steps"]),
        batch_size=int(section["batch_size"]),
        optimizer="adamw",
        lr=float(section["lr"]),
        weight_decay=0.0,
        min_lr=0.0,
        seed=seed,
        amp=False,
        warmup_epochs=float(section.get("warmup_epochs", 0.0)),
        grad_clip=section.get("grad_clip"),
        **extra,
    )


def compress_diffusion(cfg: dict[str, Any], run_dir: str | Path, *, log=print) -> dict[str, Any]:
    """Run the pipeline in ``run_dir``; returns the report (also ``report.json``)."""
    from .diffusion import DiffusionTask, NoiseSchedule, image_grid, sample
    from .fid import classifier_features, fid_of_images, reference_stats
    from .latency import (
        TimingConfig,
        benchmark,
        benchmark_sampling,
        build_latency_table,
        predict_latency,
    )
    from .models import load_model
    from .plan import Plan
    from .solve import InfeasibleBudgetError, solve_tables
    from .space import build_space
    from .tables import read_table
    from .trace import conv_weights, trace
    from .train import evaluate, fit, load_train_net, save_state_dict
    from .transform import apply, count_layers, merge

    rd = Path(run_dir)
    runner = StageRunner(rd, log=log)
    t_start = time.time()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seed"])
    shape = tuple(int(x) for x in cfg["input_shape"])
    device = cfg["device"]
    (rd / "config.json").write_text(json.dumps(cfg, indent=1))
    schedule = NoiseSchedule(**cfg["schedule"])
    imp = cfg["importance"]
    task = DiffusionTask(schedule, eval_draws=int(imp["eval_draws"]), eval_seed=seed)
    splits = task.make_data(
        cfg["data"], shape, holdout_per_class=int(imp["holdout_per_class"]), seed=seed
    )

    def fresh():
        torch.manual_seed(seed)
        return load_model(cfg["model"], cfg["model_kwargs"], None, shape).model

    # --- the base UNet ------------------------------------------------------------
    base_inputs = {
        "model": cfg["model"],
        "kw": cfg["model_kwargs"],
        "data": cfg["data"],
        "shape": shape,
        "schedule": cfg["schedule"],
        "seed": seed,
    }
    if cfg["weights"]:
        base_inputs["weights"] = file_digest(cfg["weights"])
    else:
        base_inputs["train"] = cfg["train"]

    def base_stage():
        model = fresh()
        if cfg["weights"]:
            from .models import load_weights

            load_weights(model, cfg["weights"])
        elif cfg["train"] is None:
            raise DiffusionConfigError(
                "this config fine-tunes a trained UNet: set weights: PATH (a state dict or "
                ".safetensors of the model), e.g. --set weights=PATH"
            )
        else:
            fit(
                model,
                task,
                splits.train,
                _recipe(cfg["train"], seed, ema_decay=float(cfg["train"]["ema_decay"])),
                device=device,
                checkpoint=rd / "base.pt.ckpt",
                desc="base",
            )
        save_state_dict(model.cpu(), rd / "base.pt")
        return {"files": ["base.pt"]}

    runner.run("base", base_inputs, base_stage, ["base.pt"])
    base_key = runner.key("base")
    base = fresh()
    base.load_state_dict(torch.load(rd / "base.pt", map_location="cpu", weights_only=True))
    base.eval()
    traced = trace(copy.deepcopy(base), shape)
    space = build_space(traced.chain, conv_weights(traced))

    # --- latency tables -----------------------------------------------------------
    lat = cfg["latency"]
    backends = list(lat["backends"])
    primary = backends[0]
    tables = {}
    for b in backends:
        out = f"latency_{b}.csv"

        def lat_stage(b=b, out=out):
            be = _backend(b, lat)
            build_latency_table(
                traced,
                rd / out,
                be,
                space=space,
                timing=TimingConfig(max_time_s=float(lat["max_time_s"])),
                model=cfg["model"],
                progress=False,
            )
            return {"files": [out]}

        runner.run(f"latency:{b}", {"fp": space.fingerprint, "lat": lat, "b": b}, lat_stage)
        tables[b] = read_table(rd / out, "latency")

    # --- importance -----------------------------------------------------------------
    def imp_stage():
        from .importance import build_importance_tables

        build_importance_tables(
            traced,
            space,
            task,
            splits,
            rd / "importance.csv",
            conv_out=False,
            recipe=_recipe(imp, seed),
            reinit=imp["reinit"],
            device=device,
            meta={"model": cfg["model"]},
            progress=False,
        )
        return {"files": ["importance.csv"]}

    runner.run("importance", {"base": base_key, "imp": imp, "fp": space.fingerprint}, imp_stage)
    importance = read_table(rd / "importance.csv", "importance")

    # --- solve --------------------------------------------------------------------
    table = tables[primary]
    base_pred = predict_latency(table, space.identity_plan())
    const = table.constant_ms
    plans: dict[float, Plan] = {}
    notes: list[str] = []
    for frac in cfg["solve"]["budgets"]:
        name = f"plan_{frac:.2f}.json"

        def solve_stage(frac=frac, name=name):
            budget = const + frac * (base_pred - const)
            try:
                sol = solve_tables(
                    table, importance, budget_ms=budget, precision=float(cfg["solve"]["precision"])
                )
            except InfeasibleBudgetError as e:
                return {"infeasible": str(e), "files": []}
            sol.plan.save(rd / name)
            return {"budget_ms": budget, "predicted_ms": sol.predicted_latency_ms, "files": [name]}

        res = runner.run(
            f"solve:{frac}",
            {
                "imp": runner.key("importance"),
                "lat": runner.key(f"latency:{primary}"),
                "solve": cfg["solve"]["precision"],
            },
            solve_stage,
        )
        if "infeasible" in res:
            notes.append(f"budget {frac}: {res['infeasible']}")
            log(f"budget {frac}: infeasible")
            continue
        plans[frac] = Plan.load(rd / name)

    # --- fine-tune, merge, verify -------------------------------------------------------
    ft = cfg["finetune"]
    ft_task = DiffusionTask(
        schedule,
        eval_draws=int(imp["eval_draws"]),
        eval_seed=seed,
        distill_weight=float(ft["distill"]),
    )
    for frac, plan in plans.items():
        wname = f"finetuned_{frac:.2f}.pt"

        def ft_stage(plan=plan, wname=wname, frac=frac):
            recipe = _recipe(ft, seed, ema_decay=float(ft["ema_decay"]))
            net = apply(traced, plan)
            fit(
                net,
                ft_task,
                splits.train,
                _recipe(ft, seed, ema_decay=float(ft["ema_decay"])),
                teacher=copy.deepcopy(base) if float(ft["distill"]) > 0 else None,
                device=device,
                checkpoint=rd / f"{wname}.ckpt",
                desc=f"finetune {frac}",
            )
            net = net.cpu().eval()
            merge(net)  # verified against the train-time network
            save_state_dict(net, rd / wname)
            return {"files": [wname], "recipe": recipe.to_dict(), "task": ft_task.settings()}

        runner.run(
            f"finetune:{frac}",
            {"base": base_key, "plan": plan.to_dict(), "ft": ft, "schedule": cfg["schedule"]},
            ft_stage,
        )

    def deployed(frac: float | None) -> torch.nn.Module:
        if frac is None:
            return copy.deepcopy(base).eval()
        return merge(load_train_net(traced, plans[frac], rd / f"finetuned_{frac:.2f}.pt"))

    # --- quality: FID and holdout loss ----------------------------------------------------
    q = cfg["quality"]

    def classifier_stage():
        from .tasks import ClassificationTask
        from .train import Recipe

        torch.manual_seed(seed)
        clf = load_model(q["classifier"], q["classifier_kwargs"], None, shape).model
        if q["classifier_weights"]:
            from .models import load_weights

            load_weights(clf, q["classifier_weights"])
        else:
            ctask = ClassificationTask()
            csplits = ctask.make_data(cfg["data"], shape, seed=seed)
            fit(
                clf,
                ctask,
                csplits.train,
                Recipe(steps=int(q["classifier_steps"]), batch_size=128, lr=0.1, seed=seed),
                device=device,
                desc="FID classifier",
            )
        save_state_dict(clf.cpu(), rd / "fid_classifier.pt")
        return {"files": ["fid_classifier.pt"]}

    runner.run(
        "fid-classifier",
        {
            "q": {
                k: q[k]
                for k in (
                    "classifier",
                    "classifier_kwargs",
                    "classifier_weights",
                    "classifier_steps",
                )
            },
            "data": cfg["data"],
            "shape": shape,
        },
        classifier_stage,
    )
    clf = load_model(q["classifier"], q["classifier_kwargs"], rd / "fid_classifier.pt", shape).model
    from .data import open_dataset

    ds = open_dataset(cfg["data"])
    if q["features"] == "inception":
        from .fid import inception_features

        extractor = inception_features(q["inception_weights"], device=device)
    else:
        extractor = classifier_features(
            clf,
            mean=tuple(ds.mean),
            std=tuple(ds.std),
            name=q["classifier"],
            data=cfg["data"],
            weights_digest=file_digest(rd / "fid_classifier.pt"),
        )
    ref = reference_stats(
        extractor,
        splits.test,
        cache=rd / "fid_ref_test.npz",
        source={"data": cfg["data"], "shape": list(shape)},
    )

    quality: dict[str, dict] = {}
    for frac in [None, *plans]:
        label = "base" if frac is None else f"{frac:.2f}"

        def q_stage(frac=frac, label=label):
            net = deployed(frac)
            val = evaluate(net, task, splits.holdout_val, device=device)["loss"]
            t0 = time.time()
            imgs = sample(
                net,
                int(q["n"]),
                steps=int(q["steps"]),
                seed=seed,
                batch_size=int(q["batch_size"]),
                schedule=schedule,
                device=device,
            )
            secs = time.time() - t0
            image_grid(imgs[:64]).save(rd / f"samples_{label}.png")
            res = fid_of_images(imgs, extractor, ref)
            return {
                "fid": res.fid,
                "feature_space": res.label,
                "n": res.n,
                "n_ref": res.n_ref,
                "val_loss": val,
                "sampling_seconds": secs,
                "files": [f"samples_{label}.png"],
            }

        key = {
            "ft": runner.key(f"finetune:{frac}") if frac is not None else base_key,
            "q": q,
            "clf": runner.key("fid-classifier"),
        }
        quality[label] = runner.run(f"quality:{label}", key, q_stage)

    # --- export -------------------------------------------------------------------------
    from .export import export

    exports: dict[str, list] = {}
    for frac in plans:

        def export_stage(frac=frac):
            from .unet import UNetForward

            # the UNet at the benchmark's timestep, checked against PyTorch at batch 3
            net = UNetForward(deployed(frac), traced.timestep)
            done = []
            for fmt in cfg["export"]["formats"]:
                ext = {"onnx": "onnx", "pt2": "pt2", "torchscript": "ts"}[fmt]
                done.append(export(net, fmt, rd / f"unet_{frac:.2f}.{ext}", shape))
            return {"exports": done, "files": [Path(d["path"]).name for d in done]}

        exports[f"{frac:.2f}"] = runner.run(
            f"export:{frac}",
            {"ft": runner.key(f"finetune:{frac}"), "ex": cfg["export"]},
            export_stage,
        )["exports"]

    # --- benchmark ----------------------------------------------------------------------
    bench = cfg["benchmark"]
    rows = []
    for frac, plan in plans.items():
        row: dict[str, Any] = {
            "method": "layermerge",
            "budget_frac": frac,
            "predicted_ms": predict_latency(table, plan),
            "fid": quality[f"{frac:.2f}"]["fid"],
            "val_loss": quality[f"{frac:.2f}"]["val_loss"],
            "merged_spans": sum(1 for b in plan.blocks if len(b.kept_convs) > 1),
            "pruned_convs": traced.chain.length - sum(len(b.kept_convs) for b in plan.blocks),
            **{f"deploy_{k}": v for k, v in count_layers(deployed(frac)).items()},
            "backends": {},
        }
        for b in backends:

            def bench_stage(plan=plan, b=b):
                be = _backend(b, lat)
                fwd = benchmark(
                    traced,
                    plan,
                    be,
                    # a plan's prediction is only defined on the table it was solved with
                    table=tables[b] if b == primary else None,
                    rounds=int(bench["forward_rounds"]),
                    calls_per_round=3,
                )
                smp = benchmark_sampling(
                    traced,
                    plan,
                    be,
                    steps=int(bench["sampling_steps"]),
                    rounds=int(bench["rounds"]),
                )
                return {
                    "forward_baseline_ms": fwd.baseline_ms,
                    "forward_ms": fwd.compressed_ms,
                    "forward_speedup": fwd.speedup,
                    "predicted_ms": fwd.predicted_ms,
                    "sampling_baseline_s": smp.baseline_ms / 1e3,
                    "sampling_s": smp.compressed_ms / 1e3,
                    "sampling_speedup": smp.speedup,
                    "settings": fwd.settings,
                }

            row["backends"][b] = runner.run(
                f"benchmark:{frac}:{b}",
                {"plan": plan.to_dict(), "bench": bench, "lat": lat, "b": b},
                bench_stage,
            )
        p = row["backends"][primary]
        row.update(
            measured_ms=p["forward_ms"],
            speedup=p["forward_speedup"],
            sampling_speedup=p["sampling_speedup"],
        )
        rows.append(row)

    report = {
        "task": "diffusion",
        "smoke": bool(cfg.get("is_smoke")),
        "model": cfg["model"],
        "data": cfg["data"],
        "feature_space": quality["base"]["feature_space"],
        "primary_backend": primary,
        "budgets_are": "fractions of the table latency of the unmodified UNet (its chain's "
        "entries); the constant rest of the network comes on top",
        "base": {
            "fid": quality["base"]["fid"],
            "val_loss": quality["base"]["val_loss"],
            "latency_ms": {
                r["settings"]["backend"]: r["forward_baseline_ms"]
                for row in rows
                for r in row["backends"].values()
            },
            "predicted_ms": base_pred,
            "constant_ms": const,
            **{f"deploy_{k}": v for k, v in count_layers(base).items()},
        },
        "quality_settings": {k: q[k] for k in ("n", "steps")},
        "sampling_steps": int(bench["sampling_steps"]),
        "rows": rows,
        "exports": exports,
        "notes": notes,
        "stages_ran": runner.ran,
        "stages_cached": runner.cached,
        "seconds": round(time.time() - t_start, 1),
    }
    (rd / "report.json").write_text(json.dumps(report, indent=1))
    (rd / "report.md").write_text(_markdown(report))
    log(f"report: {rd / 'report.md'}")
    return report


def _markdown(r: dict[str, Any]) -> str:
    b = r["base"]
    lines = [
        f"# LayerMerge on {r['model']} ({r['data']}): diffusion report",
        "",
        *(
            [
                "**Smoke run**: the config's smoke: settings shrink it to a quick check; the "
                "numbers below say nothing about the method.",
                "",
            ]
            if r.get("smoke")
            else []
        ),
        f"Quality: **{r['feature_space']}**, {r['quality_settings']['n']} DDIM samples "
        f"({r['quality_settings']['steps']} steps) against the test split; lower is better. "
        "Holdout loss: the denoising loss on the holdout-val split with fixed noise.",
        "",
        f"Budgets: {r['budgets_are']}. Sampling: whole DDIM runs of {r['sampling_steps']} "
        "steps at batch 1, original vs merged UNet, interleaved; forward: one UNet call.",
        "",
        f"Base UNet: FID {b['fid']:.3f}, holdout loss {b['val_loss']:.5f}, "
        f"{b['deploy_convs']} convs, {b['deploy_activations']} activations; table latency "
        f"{b['predicted_ms']:.2f} ms (constant {b['constant_ms']:.2f} ms).",
        "",
        "| budget | predicted ms | FID | holdout loss | merged spans | pruned convs | backend "
        "| forward ms (base -> merged) | forward speed-up | sampling s (base -> merged) "
        "| sampling speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        for m in row["backends"].values():
            lines.append(
                f"| {row['budget_frac']:.2f} | {row['predicted_ms']:.2f} | {row['fid']:.3f} | "
                f"{row['val_loss']:.5f} | {row['merged_spans']} | {row['pruned_convs']} | "
                f"{m['settings']['backend']} | {m['forward_baseline_ms']:.2f} -> "
                f"{m['forward_ms']:.2f} | {m['forward_speedup']:.2f}x | "
                f"{m['sampling_baseline_s']:.2f} -> {m['sampling_s']:.2f} | "
                f"{m['sampling_speedup']:.2f}x |"
            )
    for n in r["notes"]:
        lines += ["", f"- {n}"]
    lines += [
        "",
        "Samples: "
        + ", ".join(
            f"`samples_{x}.png`"
            for x in ["base"] + [f"{row['budget_frac']:.2f}" for row in r["rows"]]
        ),
        "",
    ]
    lines += [
        f"Run time: {r['seconds']:.0f} s (stages run: {', '.join(r['stages_ran']) or 'none'})."
    ]
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULTS",
    "DiffusionConfigError",
    "compress_diffusion",
    "is_diffusion_config",
    "load_diffusion_config",
    "parse_diffusion_config",
]
