"""Latency tables: fidelity, cost and delivered speed-ups (the ``## Latency`` section).

    .venv/bin/python benchmarks/bench_latency.py [--models ...] [--backends ...] [--write-docs]

For every model and backend it

1. builds the latency table with the adaptive protocol, timing the build;
2. for the pairs named by ``--reference``, builds a second table with the
   reference implementation's fixed protocol (300 warm-up + 200 timed calls per
   entry), also timed;
3. solves plans with the adaptive table, for each method (LayerMerge, activation
   removal only (kim23), layer pruning): ``--plans`` plans with seeded random
   importances at budgets spread from the method's fastest plan to 1.0 of the
   unmodified network's predicted latency (fidelity), and LayerMerge and kim23
   plans with equal importances at budgets 0.7, 0.6 and 0.5 (speed-ups);
4. merges every plan, times all the deploy networks and the BN-folded original
   interleaved in one process, and compares measured with predicted latencies
   (median and 90th-percentile relative error, mean signed error, Spearman rank
   correlation), separately for each method.

Models are registry specs, optionally with an input shape (``spec@CxHxW``);
``demo`` is the demo's network (``layermerge:resnet20``, 1 input channel, width 8,
1x28x28). Results go to ``--out-dir/results.json`` after every step; the
per-method fidelity records go to ``--out-dir/fidelity.json``, whose path is the
last line printed. ``--write-docs`` replaces the ``## Latency`` section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.latency import (
    BackendSettings,
    TimingConfig,
    build_latency_table,
    make_backend,
    measure_interleaved,
    predict_latency,
)
from layermerge.latency.constant import REFERENCES
from layermerge.solve import InfeasibleBudgetError, base_latency_ms, solve_tables
from layermerge.tables import make_table
from layermerge.transform import deploy_network

ROOT = Path(__file__).resolve().parents[1]
SPEEDUP_BUDGETS = (0.7, 0.6, 0.5)
#: where --write-docs puts the per-method fidelity records
DOCS_JSON = ROOT / "docs" / "bench_latency_fidelity.json"
METHODS = ("layermerge", "kim23", "layerprune")
DEMO = ("layermerge:resnet20", {"in_chans": 1, "num_classes": 10, "width": 8}, (1, 28, 28))


def load(spec: str):
    """A model from ``spec`` (``demo``, or a registry spec with an optional ``@CxHxW``)."""
    if spec == "demo":
        name, kwargs, shape = DEMO
        return load_model(name, kwargs, input_shape=shape)
    name, _, shape = spec.partition("@")
    return load_model(name, input_shape=tuple(map(int, shape.split("x"))) if shape else None)


def importance_table(latency, seed: int | None):
    """Importances for every option of the latency table: all equal (seed None) or
    exp(delta/100) with delta drawn uniformly from [-10, 0] percentage points."""
    rng = random.Random(seed)
    rows = []
    for r in latency.rows:
        delta = 0.0 if seed is None else -10.0 * rng.random()
        rows.append(
            {k: r[k] for k in ("start", "end", "kernel", "stride", "depthwise", "kept_convs")}
            | {"importance": math.exp(delta / 100), "delta_acc": delta}
        )
    meta = {"model_fingerprint": latency.model_fingerprint, "chain_length": latency.chain_length}
    return make_table("importance", rows, meta)


def conv_importance_table(latency, seed: int, chain):
    """Per-conv importances for layer pruning: exp(delta/100), delta uniform in
    [-10, 0], for every conv that may be dropped (the irreducible ones have none)."""
    rng = random.Random(seed)
    convs = [i for i in range(1, chain.length + 1) if not chain.conv(i).irreducible]
    rows = [{"conv": i, "importance": math.exp(-10.0 * rng.random() / 100)} for i in convs]
    meta = {"model_fingerprint": latency.model_fingerprint, "chain_length": latency.chain_length}
    return make_table("conv_importance", rows, meta)


def _quantiles(m) -> dict[str, float]:
    """A network's calls summarised several ways (for the record)."""
    return {"min": m.min_ms, "p25": m.p25_ms, "median": m.median_ms, "calls": m.runs}


def plan_key(plan) -> tuple:
    return tuple((b.key, b.kept_convs, b.activation) for b in plan.blocks)


def solve_at(latency, importance, frac, method="layermerge", conv_importance=None):
    """The plan at a budget fraction; below the fastest plan, the fastest plan
    (marked ``infeasible`` in its meta)."""
    kw = {"method": method, "conv_importance": conv_importance}
    try:
        return solve_tables(latency, importance, budget_frac=frac, **kw).plan
    except InfeasibleBudgetError as e:
        plan = solve_tables(latency, importance, budget_ms=e.min_feasible_ms, **kw).plan
        plan.meta["infeasible"] = True
        return plan


def lowest_fraction(latency, method: str, chain) -> float:
    """The fraction of the unmodified latency below which ``method`` has no plan
    (at least 0.4)."""
    base = base_latency_ms(latency)
    try:
        solve_tables(
            latency,
            importance_table(latency, None),
            method=method,
            conv_importance=conv_importance_table(latency, 0, chain),
            budget_ms=1e-9,
        )
        return 0.4
    except InfeasibleBudgetError as e:
        return max(0.4, e.min_feasible_ms / base * 1.001)


def make_plans(latency, chain, n_plans: int, seed: int):
    """Fidelity plans (distinct within each method) and speed-up plans, as
    (label, plan) lists. A method's budgets start at whichever is larger: 0.4 or
    its fastest plan's fraction (budgets below it all give that plan)."""
    fidelity = []
    for m, method in enumerate(METHODS):
        lowest = lowest_fraction(latency, method, chain)
        seen: set = set()
        for i, f in enumerate(np.linspace(lowest, 1.0, n_plans)):
            for attempt in range(20):
                s = seed + 1000 * attempt + 100_000 * m + i
                plan = solve_at(
                    latency,
                    importance_table(latency, s),
                    f,
                    method,
                    conv_importance=conv_importance_table(latency, s, chain),
                )
                if plan_key(plan) not in seen:
                    break
            if plan_key(plan) in seen:
                continue
            seen.add(plan_key(plan))
            fidelity.append((f"{method}@{f:.3f}", plan))
    equal = importance_table(latency, None)
    speed = []
    for method in ("layermerge", "kim23"):
        for f in SPEEDUP_BUDGETS:
            speed.append((f"{method}@{f}", solve_at(latency, equal, f, method)))
    return fidelity, speed


def spearman(a, b) -> float:
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        # average ranks over ties
        for v in np.unique(x):
            idx = np.nonzero(x == v)[0]
            if len(idx) > 1:
                r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def fidelity(pred, meas) -> dict:
    pred, meas = np.asarray(pred), np.asarray(meas)
    signed = (pred - meas) / meas
    err = np.abs(signed)
    return {
        "median_err": float(np.median(err)),
        "p90_err": float(np.percentile(err, 90)),
        "max_err": float(err.max()),
        "mean_signed_err": float(np.mean(signed)),
        "spearman": spearman(pred, meas) if len(pred) > 1 else float("nan"),
        "plans": len(pred),
    }


def build_table(traced, spec, settings, timing, path: Path) -> tuple:
    for p in (path, path.with_name(path.name + ".meta.json")):
        p.unlink(missing_ok=True)
    backend = make_backend(settings)
    t0 = time.perf_counter()
    table = build_latency_table(traced, path, backend, timing=timing, model=spec, progress=False)
    return table, time.perf_counter() - t0


def run_pair(spec, backend_name, args, out_dir: Path, log) -> dict:
    loaded = load(spec)
    traced = trace(loaded.model, loaded.input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    settings = BackendSettings(
        backend=backend_name, threads=args.threads, batch_size=args.batch, device=args.device
    )
    tag = f"{spec.split(':')[-1].replace('@', '_')}_{backend_name}"
    res: dict = {
        "model": spec,
        "input_shape": list(traced.chain.input_shape),
        "backend": backend_name,
        "device": args.device,
        "options": len(space.options),
        "loadavg": {"start": loadavg()},
    }

    tables = {}
    timing = TimingConfig(
        max_time_s=args.max_time,
        rel_tol=args.rel_tol,
        flush_mb=args.flush_mb,
        statistic=args.statistic,
    )
    lat, secs = build_table(traced, spec, settings, timing, out_dir / f"{tag}_adaptive.csv")
    tables["adaptive"] = lat
    res["adaptive"] = {
        "build_s": secs,
        "timed_calls": int(sum(r["runs"] + r["warmup_runs"] for r in lat.rows)),
        "constant_ms": lat.constant_ms,
        "identity_ms": lat.meta["identity_ms"],
        "memory_ms_per_mweight": lat.meta.get("memory_ms_per_mweight"),
        "slowdown": lat.meta.get("slowdown"),
        "reference_fit": {
            k: v
            for k, v in lat.meta.items()
            if any(k.startswith(f"{n}_") for n in ("pruned", *REFERENCES))
            or k in ("terms_capped", "terms_skipped", "memory_term_skipped")
        },
        "constant_raw_ms": lat.meta.get("constant_raw_ms"),
        "measurements": {
            "entries": sum(1 for r in lat.rows if r.get("runs")),
            "without activation": sum(
                1
                for r in lat.rows
                if r.get("latency_noact_ms") is not None
                and r.get("entry_ms") is not None
                and abs(r["latency_noact_ms"] - r["latency_ms"]) > 1e-12
            ),
            "dropped convs (2 each)": len(lat.meta.get("dropped_ms") or {}),
        },
        "stopped": {
            s: sum(r["stopped"] == s for r in lat.rows) for s in {r["stopped"] for r in lat.rows}
        },
    }
    # What the fixed protocol would cost here: the same preparation per entry, and
    # 300 + 200 calls of each entry at its median time instead of the adaptive calls.
    prep = secs - sum(r.get("elapsed_s") or 0.0 for r in lat.rows)
    res["adaptive"]["reference_estimate_s"] = prep + 500 * sum(
        (r.get("median_ms") or 0.0) / 1e3 for r in lat.rows
    )
    log(f"{tag}: adaptive table {secs:.0f} s, constant {lat.constant_ms:.3f} ms")
    if f"{backend_name}:{spec}" in args.reference:
        ref_timing = replace(TimingConfig.reference(), flush_mb=args.flush_mb)
        ref, secs = build_table(
            traced, spec, settings, ref_timing, out_dir / f"{tag}_reference.csv"
        )
        tables["reference"] = ref
        res["reference"] = {
            "build_s": secs,
            "timed_calls": int(sum(r["runs"] + r["warmup_runs"] for r in ref.rows)),
            "constant_ms": ref.constant_ms,
            "identity_ms": ref.meta["identity_ms"],
        }
        log(f"{tag}: reference-protocol table {secs:.0f} s")

    fid_plans, speed_plans = make_plans(lat, traced.chain, args.plans, args.seed)
    identity = space.identity_plan()
    nets: dict[str, object] = {}
    plans = {"identity": identity}
    keys = {plan_key(identity): "identity"}
    for label, plan in fid_plans + speed_plans:
        k = plan_key(plan)
        if k not in keys:
            keys[k] = label
            plans[label] = plan
    backend = make_backend(settings)
    t0 = time.perf_counter()
    for label, plan in plans.items():
        nets[label] = backend.prepare(
            deploy_network(traced, plan, one_input=True), traced.chain.input_shape
        )
    log(f"{tag}: {len(nets)} networks prepared in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    # small networks get more calls per round: each turn lasts about --min-turn-ms
    calls = max(args.calls, math.ceil(args.min_turn_ms / max(lat.meta["identity_ms"], 1e-3)))
    res["calls_per_round"] = calls
    with backend.session():
        meas = measure_interleaved(
            nets,
            rounds=args.rounds,
            calls_per_round=calls,
            max_time_s=args.max_plan_time,
            clock=backend.clock,
        )
    res["plan_timing_s"] = time.perf_counter() - t0
    res["loadavg"]["end"] = loadavg()
    stat = lat.meta["statistic"]
    measured = {label: meas[keys[plan_key(p)]].value(stat) for label, p in fid_plans + speed_plans}
    measured["identity"] = meas["identity"].value(stat)
    log(f"{tag}: networks timed in {res['plan_timing_s']:.0f} s")

    res["plans"] = {}
    fid_labels = {label for label, _ in fid_plans}
    for label, plan in [("identity", identity)] + fid_plans + speed_plans:
        res["plans"][label] = {
            "measured_ms": measured[label],
            "measured_quantiles_ms": _quantiles(meas[keys[plan_key(plan)]]),
            "blocks": len(plan.blocks),
            "method": plan.method,
            "fidelity": label in fid_labels,
            **{f"predicted_{name}_ms": predict_latency(t, plan) for name, t in tables.items()},
        }
    res["tables"] = list(tables)
    compute_fidelity(res)
    base = measured["identity"]
    res["speedups"] = {
        label: {
            "measured": base / measured[label],
            "predicted": base_latency_ms(lat) / res["plans"][label]["predicted_adaptive_ms"],
            "infeasible": bool(plan.meta.get("infeasible")),
            "blocks": len(plan.blocks),
            "kept_convs": len(plan.kept_convs),
        }
        for label, plan in speed_plans
    }
    return res


def _is_fidelity_plan(label: str, p: dict) -> bool:
    if "fidelity" in p:
        return bool(p["fidelity"])
    return bool(re.fullmatch(r"[a-z0-9]+@\d\.\d{3}", label))


def compute_fidelity(res: dict) -> None:
    """Per table and method, the fidelity of the predictions of the fidelity plans:
    as measured, and rescaled by the identity plan's measured / predicted latency
    (*per identity*: the error in predicted speed-up, free of the drift of the
    machine between the table's build and the networks' timing)."""
    plans = res["plans"]
    res["fidelity"] = {}
    names = res.get("tables") or [
        k[len("predicted_") : -len("_ms")] for k in plans["identity"] if k.startswith("predicted_")
    ]
    for name in names:
        col = f"predicted_{name}_ms"
        drift = plans["identity"]["measured_ms"] / plans["identity"][col]
        res.setdefault("identity_drift", {})[name] = drift - 1
        for variant, scale in ((name, 1.0), (f"{name}, per identity", drift)):
            res["fidelity"][variant] = {}
            for method in METHODS:
                labels = [
                    x
                    for x, p in plans.items()
                    if x != "identity" and p["method"] == method and _is_fidelity_plan(x, p)
                ]
                if labels:
                    res["fidelity"][variant][method] = fidelity(
                        [plans[x][col] * scale for x in labels],
                        [plans[x]["measured_ms"] for x in labels],
                    )


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def machine() -> str:
    from _docs import cpu_name

    cpu = cpu_name()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def report(results: list[dict], command: str, args, total_s: float) -> str:
    import onnxruntime

    lines = [
        "## Latency",
        "",
        "Latency tables (`layermerge latency`) and whole networks (`layermerge benchmark`), "
        f"measured in one run of `{command}` ({total_s / 60:.0f} min; each model and "
        f"backend in a fresh process, as one `layermerge latency` run) on {machine()}, "
        f"onnxruntime {onnxruntime.__version__}; batch {args.batch}, {args.threads} thread, "
        "float32, random weights (latency does not depend on them); the input shape is "
        "given per model (`demo` is the demo's network: `layermerge:resnet20`, width 8, "
        "1x28x28). "
        "The machine is shared with other work; each comparison below is between numbers "
        "measured in one process, the networks of one model and backend interleaved.",
        "",
        "**Fidelity per method.** For each method, plans solved with the adaptive table "
        f"and seeded random importances at {args.plans} budgets spread from the method's "
        "fastest plan (or 0.4) to 1.0 of the unmodified network (duplicates dropped). Each "
        "plan's merged network is timed and compared with its prediction (`constant_ms` + "
        "each block's entry: the option timed with the residual adds it keeps and its end "
        "activation; a block without activation, as the activation-only method makes, its "
        "entry without it; a dropped conv, what its node still computes). Error = "
        "(predicted - measured) / measured; *reference* rows use the table built with the "
        "fixed protocol. *per identity* rows rescale every prediction of a model and "
        "backend by the identity plan's measured / predicted latency: the error in the "
        "predicted speed-up, without the drift of the shared machine between the table's "
        "build and the networks' timing (identity drift per model and backend below). On "
        "a machine shared with other jobs that drift can exceed every other error; the "
        "target (median <= 5 %, 90th percentile <= 10 %, no systematic sign) is judged "
        "on the *per identity* rows there, and on both on a quiet machine.",
        "",
        "| model | input | backend | table | method | plans | median error | 90th pct "
        "| mean signed error | Spearman |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shape = "x".join(map(str, r.get("input_shape", [])))
        for name, per in r["fidelity"].items():
            for method, f in per.items():
                lines.append(
                    f"| {r['model'].partition('@')[0]} | {shape} | {r['backend']} | {name} | "
                    f"{method} | {f['plans']} | {100 * f['median_err']:.1f} % | "
                    f"{100 * f['p90_err']:.1f} % | {100 * f['mean_signed_err']:+.1f} % | "
                    f"{f['spearman']:.3f} |"
                )
    lines += [
        "",
        "**Cost.** The reference protocol times every entry with 300 warm-up and 200 "
        "timed calls. The adaptive one warms up for 0.05 s, then stops when the later "
        "half of the calls finds no call faster than the earlier half by more than "
        f"{100 * args.rel_tol:g} % (at least 12 calls), or after {args.max_time:g} s of "
        "timed calls (at least 3). Both use the same clock, statistic and cache "
        "eviction; only the number of calls differs. Where the reference table was not "
        "built its cost is "
        "estimated from the adaptive run: the same preparation time per entry plus 500 "
        "calls of each entry at its median time.",
        "",
        "| model | backend | options | adaptive: time (calls) | reference: time (calls) "
        "| adaptive / reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["adaptive"]
        if "reference" in r:
            b = r["reference"]
            ref, ref_s = f"{b['build_s']:.0f} s ({b['timed_calls']:,})", b["build_s"]
        else:
            ref_s = a["reference_estimate_s"]
            ref = f"about {ref_s:.0f} s (estimated)"
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['options']} | {a['build_s']:.0f} s "
            f"({a['timed_calls']:,}) | {ref} | {a['build_s'] / ref_s:.2f} |"
        )
    lines += [
        "",
        "**Speed-ups delivered**: BN-folded original / merged network, both measured "
        "(interleaved with all other plans of the model and backend); the adaptive "
        "table's prediction in brackets. Equal importances; the budget is a fraction of "
        "the original's predicted latency.",
        "",
        "| model | backend | budget | LayerMerge | activation-only (kim23) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        for f in SPEEDUP_BUDGETS:
            cells = []
            for method in ("layermerge", "kim23"):
                x = r["speedups"][f"{method}@{f}"]
                cells.append(
                    f"{x['measured']:.2f}x ({x['predicted']:.2f}x)"
                    + (", budget infeasible: fastest plan" if x["infeasible"] else "")
                )
            lines.append(f"| {r['model']} | {r['backend']} | {f} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Where a budget is below the fastest plan of a method, its fastest plan is "
        "shown. Activation-only merging cannot make ResNet-34 faster: two 3x3 convs "
        "merge into a 5x5 conv with 25/18 of their work, so its fastest plan is the "
        "original itself. Speed-ups are relative to the original with BatchNorm folded "
        "(the identity plan merged), not to the unfolded network.",
    ]
    lines += [
        "",
        "**Constant part** (`constant_ms`: what no plan changes, i.e. the stem, the "
        "head, pooling, the classifier and the ops at breaks; residual adds are in the "
        "entries of the options that keep them, see docs/latency.md). It is the "
        "BN-folded original timed as a whole minus the sum of its per-conv entries, so "
        "the prediction for the unmodified network is its measured time. The original is "
        "timed with single calls spread over the whole build (about a tenth of its "
        "time) pooled with a final burst, so that it sees the same load of other jobs "
        "as the entries:",
        "",
    ]
    for r in results:
        a = r["adaptive"]
        drift = r.get("identity_drift", {}).get("adaptive")
        beta = a.get("memory_ms_per_mweight")
        slowdown = a.get("slowdown")
        lines.append(
            f"- {r['model']}, {r['backend']}: {a['constant_ms']:.3f} ms of "
            f"{a['identity_ms']:.3f} ms"
            + (f", memory term {beta:.4f} ms per million weights" if beta is not None else "")
            + (f", slowdown {100 * slowdown:.1f} % of the entries" if slowdown is not None else "")
            + (
                f"; the identity network measured {100 * drift:+.1f} % against its prediction "
                "when the plans were timed"
                if drift is not None
                else ""
            )
        )
    lines += [
        "",
        "The error left for other plans is whatever does not add up between a layer "
        "timed alone and the same layer inside a network; the constant cannot absorb "
        "it because it changes with the plan. Three things are done so that "
        "isolated entries add up:",
        "",
        "- the fixed cost of one backend call (measured on a one-element ReLU timed "
        "like an entry: a few microseconds hot, tens after the cache eviction) is "
        "subtracted from every entry, so it is counted once, in the constant;",
        "- on ONNX Runtime's CPU provider a lone conv runs as ReorderInput -> Conv "
        "(blocked NCHWc) -> ReorderOutput, while in a network the layout stays blocked "
        "from conv to conv; the two reorders' time is read from ORT's profiler and "
        "subtracted. Without this, entries were up to 25 % too high and merged "
        "MobileNetV2 plans were predicted about 10 % too fast. The reorders' time is "
        "read from calls made after the same cache eviction as the timed calls (latency "
        "model 3): read hot, as before, it was half of what the cold timed calls spent "
        "on them, so about 1 ms of reorders stayed in MobileNetV2's entries at 160x160, "
        "the constant came out negative, and kim23 and LayerMerge plans were "
        "under-predicted by up to 28 % (per identity);",
        "- before each timed call the core's private caches are evicted (2 x L2 "
        "written): timed back to back, a layer finds its weights and input hot "
        "from its own previous call, which inside a network it never does. This "
        "matters for MobileNetV2's memory-bound layers: without eviction plans with "
        "few blocks were over-predicted by 25-40 % (PyTorch median "
        "error 26 %, ONNX Runtime 8 %); evicting all of L3 (32 MiB) instead brought "
        "PyTorch to 2 % but made ONNX Runtime under-predict by 10 % (12 plans each, "
        "earlier runs of this script with `--flush-mb 0` and `--flush-mb 32`).",
        "",
        "A network whose weights and largest activations fit in the L2 cache (the demo "
        "network) is timed without eviction: there every layer finds its weights and "
        "input hot, and cold entries summed to 1.6x the network (negative constant). "
        "Two costs grow with what a plan keeps and are fitted on reference networks "
        "timed interleaved with the original (the network that drops every droppable "
        "conv, and LayerMerge and kim23 plans at their fastest and halfway to the "
        "original): a slowdown, a share of each entry (a network's best call is slower "
        "than the sum of its layers' best calls), and a memory term per weight (a "
        "layer inside a network reads its weights after the rest of the network went "
        "through the caches). Both are above; docs/latency.md explains them. Whole "
        "networks are timed without eviction, as they run.",
        "",
        "What a plan changes besides its convs is in the entries: each option is timed "
        "in context, with the residual adds it keeps (a second input, through the "
        "skip's projection conv if it has one) and its end activation as one module, so "
        "that ONNX Runtime fuses conv + add + activation as it does in the network; an "
        "option keeping all its convs is also timed without its end activation (the "
        "inner blocks of activation-only plans), and each conv that layer pruning may "
        "drop has the cost of what its node still computes (`dropped_ms`). Before this "
        "(latency model 1) the adds stayed in the constant: LayerMerge plans, which fold "
        "them, were over-predicted by up to +24 % and layer-pruning plans, which keep "
        "unfused adds and activations, under-predicted by up to -21 % (demo network, "
        "ONNX Runtime).",
        "",
        "Why CPU time and the minimum. The two cores of this machine are shared with "
        "other jobs (load average "
        + ", ".join(
            f"{r['loadavg']['start']:.1f}-{r['loadavg']['end']:.1f}"
            for r in results
            if r.get("loadavg", {}).get("start") is not None
        )
        + " during the phases of this run). On the wall clock a call also counts the "
        "time the operating system gave the core to another job: a 100 ms network took "
        "300 ms of wall time and 100 ms of CPU time, and the calls of one network fall "
        "into clusters one time slice apart (e.g. 7.3 ms and 11.3 ms). Entries take "
        "milliseconds and often run undisturbed, whole networks take long enough to be "
        "interrupted nearly every call, so on the wall clock the sum of the entries "
        "under-predicted the networks by up to 30 % (ResNet-34, PyTorch, in an earlier "
        "run of this script). With one thread a call's CPU time (`time.process_time`) "
        "is its latency without those interruptions; the minimum over the calls then "
        "removes what remains (a busy sibling core, caches shared with other jobs). "
        "With several threads or on a GPU the wall clock is used (`--clock` overrides).",
        "",
    ]
    return "\n".join(lines)


def write_records(results: list[dict], path: Path) -> Path:
    """The per-method fidelity as flat records (one per model, backend, table and
    method) in a JSON file; returns its path."""
    records = [
        {
            "model": r["model"],
            "input_shape": r.get("input_shape"),
            "backend": r["backend"],
            "table": name,
            "method": method,
            **f,
        }
        for r in results
        for name, per in r["fidelity"].items()
        for method, f in per.items()
    ]
    path.write_text(json.dumps({"records": records}, indent=2) + "\n")
    return path


def _run_pair_process(spec: str, backend: str, argv: list[str] | None, out_dir: Path, log):
    """One model and backend in a fresh process, as a user builds one table per
    `layermerge latency` run: what one pair leaves behind in the process (sessions,
    allocator state) does not reach the next one's timings."""
    out = out_dir / f"pair-{os.getpid()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve())]
    cmd += list(sys.argv[1:] if argv is None else argv)
    cmd += ["--pair", spec, backend, "--pair-out", str(out)]
    log(f"{spec} on {backend}: a fresh process")
    subprocess.run(cmd, check=True)
    res = json.loads(out.read_text())
    out.unlink()
    return res


def write_docs(section: str) -> Path:
    from _docs import write_section

    return write_section("## Latency", section)


def _is_elapsed(argv: list[str], i: int) -> bool:
    return argv[i] == "--elapsed-min" or (i > 0 and argv[i - 1] == "--elapsed-min")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["torchvision:resnet34", "torchvision:mobilenet_v2", "demo"],
        help="registry specs, optionally spec@CxHxW; 'demo' is the demo's network",
    )
    ap.add_argument("--backends", nargs="+", default=["onnxruntime", "torch"])
    ap.add_argument(
        "--reference",
        nargs="*",
        default=[],
        metavar="BACKEND:MODEL",
        help="pairs that also get a reference-protocol table (slow)",
    )
    ap.add_argument(
        "--plans", type=int, default=12, help="fidelity budgets per method, model and backend"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda (torch: the GPU; onnxruntime: its CUDA provider)",
    )
    ap.add_argument("--max-time", type=float, default=0.5, help="adaptive cap per entry (s)")
    ap.add_argument("--rel-tol", type=float, default=0.02)
    ap.add_argument(
        "--statistic",
        choices=("min", "median"),
        default="min",
        help="what summarises an entry's and a network's calls",
    )
    ap.add_argument(
        "--flush-mb", type=float, default=None, help="evicted between calls (default: 2 x L2)"
    )
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds over the networks")
    ap.add_argument("--calls", type=int, default=2, help="calls per network per round")
    ap.add_argument(
        "--min-turn-ms",
        type=float,
        default=20.0,
        help="more calls per round for networks faster than this (ms per turn)",
    )
    ap.add_argument("--max-plan-time", type=float, default=150.0, help="cap on the rounds (s)")
    ap.add_argument(
        "--out-dir", default=str(Path(tempfile.gettempdir()) / "layermerge-bench-latency")
    )
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--pair", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    ap.add_argument("--pair-out", help=argparse.SUPPRESS)
    ap.add_argument(
        "--from-results",
        metavar="RESULTS.json",
        help="only write the report of an earlier run (give that run's other flags too)",
    )
    ap.add_argument(
        "--elapsed-min", type=float, help="with --from-results: the earlier run's duration"
    )
    args = ap.parse_args(argv)
    argv_shown = [
        a
        for a in (sys.argv[1:] if argv is None else argv)
        if a != "--from-results" and not a.endswith("results.json")
    ]
    argv_shown = [a for i, a in enumerate(argv_shown) if not _is_elapsed(argv_shown, i)]
    command = ".venv/bin/python benchmarks/bench_latency.py " + shlex.join(argv_shown)
    if args.from_results:
        results = json.loads(Path(args.from_results).read_text())
        for r in results:
            compute_fidelity(r)
        total = (args.elapsed_min or 0) * 60 or results[-1].get("elapsed_total_s", 0)
        section = report(results, command.strip(), args, total)
        print(section)
        out = Path(args.from_results).with_name("fidelity.json")
        if args.write_docs:
            print(f"wrote {write_docs(section)}")
            out = DOCS_JSON
        print(write_records(results, out))
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    if args.pair:
        spec, be = args.pair
        res = run_pair(spec, be, args, out_dir, log)
        Path(args.pair_out).write_text(json.dumps(res) + "\n")
        return 0
    results = []
    for spec in args.models:
        for be in args.backends:
            results.append(_run_pair_process(spec, be, argv, out_dir, log))
            results[-1]["elapsed_total_s"] = time.perf_counter() - t_start
            (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            for name, per in results[-1]["fidelity"].items():
                for method, f in per.items():
                    log(
                        f"{spec} {be} {name} {method}: median error "
                        f"{100 * f['median_err']:.1f} %, 90th pct {100 * f['p90_err']:.1f} %, "
                        f"mean signed {100 * f['mean_signed_err']:+.1f} %"
                    )
            write_records(results, out_dir / "fidelity.json")
    section = report(results, command.strip(), args, time.perf_counter() - t_start)
    print(section)
    out = out_dir / "fidelity.json"
    if args.write_docs:
        print(f"wrote {write_docs(section)}")
        write_records(results, out)
        out = DOCS_JSON
    print(write_records(results, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
