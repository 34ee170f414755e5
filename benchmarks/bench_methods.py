"""Which compression method gives the best accuracy at equal measured latency:
LayerMerge against activation removal only (kim23), layer pruning only and
structured channel pruning (torch-pruning), on two networks trained on Fashion-MNIST.

Per architecture (``ARCHS``: a ResNet-14 and a MobileNetV2 of inverted residual
blocks) the library's own ``compress`` pipeline runs in one run directory under
``--workdir``: base training, latency tables (ONNX Runtime and PyTorch, 1 thread,
batch 1), importance tables, every method at every budget, fine-tunes with several
seeds, ONNX export, and one interleaved timing pool per backend. Every stage is
cached there, so an interrupted run resumes where it stopped.

From the runs' ``report.json`` it writes the "Method comparison" section of
docs/methods.md (tables, a figure per architecture, the leader per latency region
against the seeds' spread, each plan's blocks, the Spearman correlation of the DP
objective with the accuracy drop) and a JSON (one record per architecture, method
and budget) whose path it prints last: once every run is complete, or with
``--partial`` from what the run directories hold so far, running nothing.

    nice -n 19 .venv/bin/python benchmarks/bench_methods.py            # full run (hours)
    nice -n 19 .venv/bin/python benchmarks/bench_methods.py --quick    # a few minutes
    .venv/bin/python benchmarks/bench_methods.py --partial             # report the cache
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_MININTERVAL", "60")  # progress bars would fill the log

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import cpu_name, write_section  # noqa: E402
from bench_importance_protocols import spearman  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "methods.md"
HEADING = "## Method comparison"
METHODS = ["layermerge", "kim23", "layerprune", "layermerge-drop", "channelprune"]
PLAN_METHODS = ("layermerge", "kim23", "layerprune", "layermerge-drop")
LABELS = {
    "layermerge": "LayerMerge",
    "kim23": "kim23 (activation removal)",
    "layerprune": "layer pruning",
    "layermerge-drop": "LayerMerge + drops",
    "channelprune": "channel pruning",
}
MIN_BASE_ACC = 91.0
_TRAIN = {"batch_size": 128, "lr": 0.1, "weight_decay": 5e-4}
# Budgets per architecture, as far as LayerMerge reaches on ONNX Runtime at batch 1: a
# width-1.0 MobileNetV2-mini (8-32 channels) is so small that ONNX Runtime's fixed cost
# per call and the stem and head (outside the chain) are ~85 % of its latency, and its
# fastest LayerMerge plan is ~0.87 of the base; at width 2.0 (16-64 channels) it is
# ~0.61-0.67, so its budgets are 0.9, 0.8, 0.7.
ARCHS = {
    "resnet14": {
        "model": "layermerge:resnet14",
        "model_kwargs": {"in_chans": 1, "width": 8},
        "train": {"epochs": 10.0, **_TRAIN},
        "budgets": [0.8, 0.7, 0.55],
    },
    "mobilenetv2_mini": {
        "model": "layermerge:mobilenetv2_mini",
        "model_kwargs": {"in_chans": 1, "width_mult": 2.0},
        "train": {"epochs": 10.0, **_TRAIN},
        "budgets": [0.9, 0.8, 0.7],
    },
}
FULL = {
    "budgets": None,  # None: each architecture's; a list (--budgets): every architecture's
    "seeds": 3,
    "latency": {"backends": ["onnxruntime", "torch"], "max_time_s": 0.3},
    "importance": {"protocol": "default"},
    # the demo's recipe: 300 SGD steps of batch 128, distillation weight 0.5
    "finetune": {"steps": 300, "batch_size": 128, "lr": 0.02, "distill": 0.5},
    "benchmark": {"rounds": 10, "calls_per_round": 5, "max_time_s": 20.0},
    "subset": None,  # [train images, test images] of Fashion-MNIST; None: all of it
}
FULL["latency"].update(threads=1, batch_size=1)
QUICK = {
    "train": {"steps": 40, "batch_size": 64, "lr": 0.05},
    "budgets": "ends",  # the first and last of each architecture's budgets
    "seeds": 1,
    "latency": {**FULL["latency"], "max_time_s": 0.02},
    "importance": {"protocol": "default", "holdout_images": 80, "steps": 1, "batch_size": 16},
    "finetune": {"steps": 3, "batch_size": 32, "lr": 0.02, "distill": 0.5},
    "benchmark": {"rounds": 2, "calls_per_round": 2, "max_time_s": 3.0},
    "subset": [2000, 1000],
}
QUICK["importance"]["calibration"] = 2


# ------------------------------------------------------------------------ statistics


def pooled_sd(a: dict, b: dict) -> float:
    """The pooled SD of two rows' seeds (nan with fewer than 3 fine-tunes in all)."""
    na, nb = a.get("seeds") or 1, b.get("seeds") or 1
    if na + nb <= 2:
        return float("nan")
    sa, sb = a.get("accuracy_std") or 0.0, b.get("accuracy_std") or 0.0
    return math.sqrt(((na - 1) * sa**2 + (nb - 1) * sb**2) / (na + nb - 2))


def verdict(gap: float, sd: float) -> str:
    if math.isnan(sd):
        return "one seed: no spread to compare with"
    if sd == 0:
        return "exceeds the spread (SD 0)" if gap else "tie"
    r = abs(gap) / sd
    if r >= 1:
        return f"clear: {r:.1f}x the pooled SD" if r >= 2 else f"{r:.1f}x the pooled SD, not 2x"
    return f"within the seeds' spread ({r:.1f}x the pooled SD)"


def _fmt(v, spec=".2f") -> str:
    return "–" if v is None or v != v else format(v, spec)  # v != v: nan


def _acc(r: dict) -> str:
    if r.get("accuracy_mean") is None:
        return "–"
    sd = f" ± {r['accuracy_std']:.2f}" if (r.get("seeds") or 1) > 1 else ""
    return f"{r['accuracy_mean']:.2f}{sd}"


def _speedup(rec: dict, b: str):
    return (rec.get("backends") or {}).get(b, {}).get("speedup")


# ------------------------------------------------------------------------ running


def arch_settings(arch: str, s: dict) -> dict:
    """The settings ``s`` with ``budgets`` resolved for ``arch``."""
    own, b = ARCHS[arch]["budgets"], s["budgets"]
    return {**s, "budgets": own if b is None else [own[0], own[-1]] if b == "ends" else b}


def compress_config(arch: dict, s: dict, data: str, threads: int | None) -> dict:
    return {
        "model": arch["model"],
        "model_kwargs": arch["model_kwargs"],
        "input_shape": [1, 28, 28],
        "data": data,
        "seed": 0,
        "device": "cpu",
        **({"threads": threads} if threads else {}),
        "train": s.get("train") or arch["train"],
        "latency": s["latency"],
        "importance": s["importance"],
        "solve": {"methods": METHODS, "budgets": s["budgets"]},
        "finetune": {**s["finetune"], "seeds": s["seeds"]},
        "export": {"formats": ["onnx"]},
        "benchmark": s["benchmark"],
    }


def subset_data(wd: Path, n_train: int, n_test: int) -> str:
    """The first images of Fashion-MNIST's splits as IDX files in ``wd``/data."""
    from layermerge.data.formats import DEFAULT_FASHION_MNIST, read_idx, write_idx

    out = wd / "data"
    out.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        for what in ("images-idx3", "labels-idx1"):
            name = f"{split}-{what}-ubyte.gz"
            if not (out / name).exists():
                write_idx(out / name, read_idx(DEFAULT_FASHION_MNIST / name)[:n])
    return f"fashion-mnist:{out}"


def run_arch(name: str, cfg_dict: dict, run_dir: Path) -> float:
    from layermerge.pipeline import compress, parse_config

    cfg = parse_config(copy.deepcopy(cfg_dict), where=name)
    t0 = time.time()
    compress(cfg, run_dir, log=lambda m: print(f"[{time.strftime('%H:%M:%S')} {name}] {m}"))
    return time.time() - t0


# ------------------------------------------------------------------------ reading runs


def _stages(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "stages.json").read_text())["stages"]
    except (OSError, ValueError, KeyError):
        return {}


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Seconds per kind of stage (base, finetune, ...), whichever invocation ran it."""
    out: dict[str, float] = {}
    for n, rec in _stages(run_dir).items():
        out[n.split(":")[0]] = out.get(n.split(":")[0], 0.0) + float(rec.get("seconds") or 0)
    return {k: round(v, 1) for k, v in out.items()}


def report_is_current(rep: dict, s: dict) -> bool:
    rows = [r for r in rep.get("rows", []) if r.get("accuracy_mean") is not None]
    budgets = {r["budget_frac"] for r in rep.get("rows", [])}
    same_seeds = all(r.get("seeds") == s["seeds"] for r in rows)
    return bool(rows) and same_seeds and budgets <= set(s["budgets"])


def rows_from_cache(run_dir: Path, s: dict) -> dict:
    """A report of an unfinished run from its stage records: no pooled timings."""
    from layermerge.pipeline import digest

    stages = _stages(run_dir)
    rows, notes = [], []

    def add(row: dict) -> None:
        d = row["digest"]
        names = [f"finetune:{d}"] + [f"finetune:{d}:seed+{k}" for k in range(1, s["seeds"])]
        done = [stages[n]["result"] for n in names if n in stages]
        accs = [x["accuracy"] for x in done]
        row.update(seeds=len(accs), accuracy_by_seed=accs, accuracy_mean=None)
        if accs:
            row.update(
                accuracy_mean=statistics.fmean(accs),
                accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                accuracy_before_finetune=done[0].get("accuracy_before"),
                params=done[0].get("params"),
            )
        rows.append(row)

    for m in PLAN_METHODS:
        res = stages.get(f"solve:{m}", {}).get("result", {}).get("budgets", {})
        for frac in s["budgets"]:
            r = res.get(str(frac))
            if r and "infeasible" in r:
                notes.append(f"{m} at budget {frac:g}: {r['infeasible']}")
            elif r:
                add({"method": m, "budget_frac": frac, **r})
    base_key = stages.get("base", {}).get("key")
    for frac in s["budgets"]:
        r = stages.get(f"channelprune:{frac:g}", {}).get("result")
        if r and base_key:  # the row's digest as pipeline.networks makes it
            d = {"method": "channelprune", "ratio": r["ratio"], "base": base_key}
            d = digest({**d, "pruning": r["pruning"]})
            row = {"method": "channelprune", "budget_frac": frac, "plan": None, "digest": d}
            add({**row, "ratio": r["ratio"], "search_ms": r["measured_ms"]})
    base = dict(stages.get("base", {}).get("result", {}))
    return {"base": base, "rows": rows, "notes": notes, "timing_pool": {}}


# ------------------------------------------------------------------------ plan anatomy


def importance_tables(run_dir: Path) -> tuple[dict, dict]:
    """The run's importance entries by option key, and its per-conv entries by conv."""
    from layermerge.tables import read_table

    by_key, by_conv = {}, {}
    for name in _stages(run_dir).get("importance", {}).get("outputs", {}):
        if not name.endswith(".csv"):
            continue
        if name.startswith("importance-"):
            for r in read_table(run_dir / name, "importance").rows:
                k = (r["start"], r["end"], r["kernel"], r["stride"], bool(r["depthwise"]))
                by_key[k + (tuple(r["kept_convs"]),)] = r
        else:
            by_conv = {r["conv"]: r for r in read_table(run_dir / name, "conv_importance").rows}
    return by_key, by_conv


def conv_names(arch: dict) -> dict[int, str]:
    from layermerge import load_model, trace

    loaded = load_model(arch["model"], dict(arch["model_kwargs"]), None, (1, 28, 28))
    chain = trace(loaded.model.eval(), loaded.input_shape).chain
    return {c.index: c.path.removesuffix(".0").replace("features.", "f") for c in chain.convs}


def plan_changes(run_dir: Path, row: dict, names: dict, tables: tuple) -> list[dict]:
    """What a plan changed, block by block (merged spans, dropped convs, removed
    activations), each with its importance entry: importance (1: no change) and
    delta_acc (holdout accuracy change in points after the protocol's short fine-tune)."""
    from layermerge.plan import Plan

    if not row.get("plan"):
        return []
    by_key, by_conv = tables
    out = []
    for b in Plan.load(run_dir / row["plan"]).blocks:
        convs, kept = list(range(b.start + 1, b.end + 1)), list(b.kept_convs)
        if convs == kept and len(convs) == 1 and b.activation:
            continue  # unchanged
        span = str(names.get(convs[0], convs[0]))
        if len(convs) > 1:
            span += f"..{names.get(convs[-1], convs[-1])}"
        entry = by_key.get((b.start, b.end, b.kernel, b.stride, b.depthwise, tuple(kept)))
        if not kept:
            what, entry = f"drop {span}", by_conv.get(b.end, entry)
        elif len(convs) > 1:
            dropped = ", ".join(str(names.get(c, c)) for c in convs if c not in kept)
            what = f"merge {span} -> {b.kernel}x{b.kernel}" + (
                f", dropping {dropped}" if dropped else ""
            )
        else:
            what = f"keep {span}"
        what += "" if b.activation else " (no activation after it)"
        e = entry or {}
        out.append(
            {"change": what, "importance": e.get("importance"), "delta_acc": e.get("delta_acc")}
        )
    return out


def describe(changes: list[dict]) -> str:
    def one(c):
        if c["importance"] is None or c["delta_acc"] is None:
            return c["change"]
        return f"{c['change']} [I={c['importance']:.3f}, Δacc {c['delta_acc']:+.1f}]"

    return "; ".join(one(c) for c in changes) if changes else "nothing changed"


# ------------------------------------------------------------------------ analysis


def records_of(arch: str, rep: dict, s: dict, run_dir: Path, names, tables) -> list[dict]:
    """One record per method and budget (infeasible ones included)."""
    recs, by = [], {(r["method"], r["budget_frac"]): r for r in rep["rows"]}
    for m in METHODS:
        for frac in s["budgets"]:
            r, rec = by.get((m, frac)), {"arch": arch, "method": m, "budget": frac}
            if r is None:
                notes = [n for n in rep.get("notes", []) if n.startswith(f"{m} at budget {frac:g}")]
                reason = notes[0] if notes else "no row (not solved yet)"
                recs.append({**rec, "infeasible": reason, "seeds": 0, "accuracy_mean": None})
                continue
            ms, sp = r.get("measured_ms_by_backend") or {}, r.get("speedup_by_backend") or {}
            keys = ("seeds", "accuracy_mean", "accuracy_std", "accuracy_by_seed")
            keys += ("accuracy_before_finetune", "predicted_ms", "objective", "params", "digest")
            rec.update({k: r.get(k) for k in keys})
            rec["backends"] = {
                b: {"ms": ms.get(b), "speedup": sp.get(b)} for b in s["latency"]["backends"]
            }
            if m == "channelprune":
                rec.update(ratio=r.get("ratio"), search_ms=r.get("search_ms"))
            else:
                rec["changes"] = plan_changes(run_dir, r, names, tables)
            recs.append(rec)
    return recs


def regions(recs: list[dict], budgets: list[float], backends: list[str]) -> list[dict]:
    """Per budget (latency region) and backend: the methods by accuracy, and the
    leader's gap to each other method against the pooled SD of their seeds."""
    out = []
    for frac in budgets:
        rows = [r for r in recs if r["budget"] == frac and r.get("accuracy_mean") is not None]
        rows.sort(key=lambda r: -r["accuracy_mean"])
        for b in backends if rows else []:
            lead, behind = rows[0], []
            for r in rows[1:]:
                gap, sd = lead["accuracy_mean"] - r["accuracy_mean"], pooled_sd(lead, r)
                behind.append(
                    {"method": r["method"], "gap": gap, "pooled_sd": sd,
                     "verdict": verdict(gap, sd), "speedup": _speedup(r, b)}
                )  # fmt: skip
            out.append(
                {"budget": frac, "backend": b, "leader": lead["method"],
                 "leader_speedup": _speedup(lead, b), "behind": behind}
            )  # fmt: skip
    return out


def interpolate(points: list[tuple[float, float, float]], x: float):
    """(accuracy, SD) of a method at speed-up ``x``, linear between its measured points
    (the base network at 1.0 included); ``None`` outside their range."""
    pts = sorted(points)
    for (x0, y0, s0), (x1, y1, s1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return y0 + t * (y1 - y0), s0 + t * (s1 - s0)
    return None


def equal_latency(recs: list[dict], base_acc: float, backends: list[str]) -> list[dict]:
    """LayerMerge's points against each other method's accuracy interpolated at
    LayerMerge's measured speed-up (the base network is every method's point at 1.0)."""
    out = []
    done = [r for r in recs if r.get("accuracy_mean") is not None]
    for b in backends:
        for other in METHODS[1:]:
            theirs = [r for r in done if r["method"] == other and _speedup(r, b)]
            pts = [(1.0, base_acc, 0.0)] + [
                (_speedup(r, b), r["accuracy_mean"], r.get("accuracy_std") or 0.0) for r in theirs
            ]
            seeds = max([r.get("seeds") or 1 for r in theirs] or [1])
            for r in (r for r in done if r["method"] == "layermerge" and _speedup(r, b)):
                x, y = _speedup(r, b), interpolate(pts, _speedup(r, b)) if theirs else None
                rec = {"backend": b, "budget": r["budget"], "other": other, "speedup": x,
                       "layermerge": r["accuracy_mean"], "other_at_speedup": None}  # fmt: skip
                if y is not None:
                    gap = r["accuracy_mean"] - y[0]
                    sd = pooled_sd(r, {"seeds": seeds, "accuracy_std": y[1]})
                    out.append({**rec, "other_at_speedup": y[0], "gap": gap, "pooled_sd": sd,
                                "verdict": verdict(gap, sd)})  # fmt: skip
                elif theirs and x > max(p[0] for p in pts):  # faster than all of theirs
                    f = max(theirs, key=lambda t: _speedup(t, b))
                    gap, sd = r["accuracy_mean"] - f["accuracy_mean"], pooled_sd(r, f)
                    v = (
                        "LayerMerge dominates: faster and more accurate than the fastest"
                        if gap >= 0
                        else "no equal-latency point: LayerMerge faster, less accurate than the fastest"
                    )
                    v += f" {LABELS[other]} network ({_speedup(f, b):.2f}x); {verdict(gap, sd)}"
                    out.append({**rec, "gap": gap, "pooled_sd": sd, "verdict": v})
    return out


def objective_correlation(recs: list[dict], base_acc: float) -> list[dict]:
    """Per plan method: Spearman of the DP objective with the accuracy drop."""
    out = []
    for m in PLAN_METHODS:
        rs = [r for r in recs if r["method"] == m and r.get("accuracy_mean") is not None]
        rs = [r for r in rs if r.get("objective") is not None]
        if not rs:
            continue
        obj = [r["objective"] for r in rs]
        drop = [base_acc - r["accuracy_mean"] for r in rs]
        before = [base_acc - (r.get("accuracy_before_finetune") or math.nan) for r in rs]
        out.append(
            {"method": m, "n": len(rs), "distinct_plans": len({r.get("digest") for r in rs}),
             "objective": obj, "drop": drop, "drop_before_finetune": before,
             "spearman": spearman(obj, drop) if len(rs) > 1 else math.nan,
             "spearman_before_finetune": spearman(obj, before) if len(rs) > 1 else math.nan}
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------ figures, docs


def figure(arch: str, res: dict, backends: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(backends), figsize=(5.2 * len(backends), 4.2), sharey=True)
    axes = [axes] if len(backends) == 1 else list(axes)
    for ax, b in zip(axes, backends):
        ax.scatter([1.0], [res["base_accuracy"]], color="black", marker="*", s=120, label="base")
        for m in METHODS:
            rs = [r for r in res["records"] if r["method"] == m and r.get("accuracy_mean")]
            rs = sorted((r for r in rs if _speedup(r, b)), key=lambda r: _speedup(r, b))
            if rs:
                x, y = [_speedup(r, b) for r in rs], [r["accuracy_mean"] for r in rs]
                err = [r.get("accuracy_std") or 0.0 for r in rs]
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=LABELS[m])
        ax.set_xlabel(f"measured speed-up ({b}, 1 thread, batch 1)")
        ax.set_title(f"{arch}: {b}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy % (mean ± SD over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rel(p: Path, to: Path) -> str:
    try:
        return str(p.resolve().relative_to(to.resolve()))
    except ValueError:
        return str(p)


def section(result: dict, json_path: Path) -> str:
    s, mode, ft = result["settings"], result["run"], result["settings"]["finetune"]
    flag = {"full": "", "quick": " --quick"}.get(mode, " --partial") + result["flags"]
    lines = [
        HEADING,
        "",
        f"Produced by `nice -n 19 .venv/bin/python benchmarks/bench_methods.py{flag}`.",
    ]
    if mode == "quick":
        lines[-1] += " **The quick run**: tiny settings, its numbers decide nothing."
    elif mode == "partial":
        lines[-1] += (
            " **A partial report** from the cache: rows not yet fine-tuned have no accuracy, "
            "and no row has measured latencies before its architecture's timing pool ran."
        )
    lines += [
        "",
        f"Machine: {result['machine']}. Latency: {', '.join(s['latency']['backends'])}, 1 "
        "thread, batch 1. Budgets (per architecture, below): fractions of the base network's "
        "latency as the onnxruntime table predicts it (channel pruning: as measured on "
        "onnxruntime, its ratio bisected). Importance protocol "
        f"`{s['importance']['protocol']}`. Fine-tune: {ft['steps']} steps of batch "
        f"{ft['batch_size']}, lr {ft['lr']}, distillation weight {ft['distill']}, {s['seeds']} "
        "seed(s) per network. Accuracy: Fashion-MNIST test accuracy, mean ± SD over the seeds. "
        "All latencies of one architecture and backend come from one interleaved pool (the "
        "base and every network in one process), so its rows compare.",
        "",
    ]
    for arch, a in result["archs"].items():
        lines += _arch_lines(result, arch, a)
    lines += [
        "### Reading the numbers",
        "",
        "A region is one budget. Methods land at different measured speed-ups within it "
        "(LayerMerge, kim23 and layer pruning meet the budget as the latency table predicts "
        "it, channel pruning as measured), so each region gives every method's speed-up, "
        "and the equal-latency table compares LayerMerge with each baseline's accuracy "
        "interpolated (linearly between its measured points, the base network at 1.0 "
        "included) at LayerMerge's own measured speed-up. A gap is called clear at twice "
        "the pooled SD of the seeds (with 3 seeds a side, about p = 0.07 in a two-sided "
        "t-test). The seeds vary the fine-tune only: the base network, the importance "
        "table and so each plan are fixed, so the SD leaves out their noise.",
        "",
        f"JSON: `{_rel(json_path, ROOT)}` (one record per architecture, method and budget; "
        "the path the script prints last).",
    ]
    return "\n".join(lines) + "\n"


def _arch_lines(result: dict, arch: str, a: dict) -> list[str]:
    st, base_acc = a["stage_seconds"], a["base_accuracy"]
    ok = "" if a["base_ok"] else f" **(below the {MIN_BASE_ACC:g} % target)**"
    times = ", ".join(f"{k} {v / 60:.1f}" for k, v in sorted(st.items(), key=lambda x: -x[1]))
    wall = a.get("wall_s_this_invocation")
    lat = ", ".join(f"{b} {_fmt(ms, '.3f')} ms" for b, ms in a["base_ms"].items()) or "not timed"
    lines = [
        f"### {arch}",
        "",
        f"`{a['model']}` {json.dumps(a['model_kwargs'])}, trained {json.dumps(a['train'])}: "
        f"base test accuracy **{_fmt(base_acc)} %**{ok}; base latency {lat}; budgets "
        f"{', '.join(f'{b:g}' for b in a['budgets'])}. Time: "
        f"{sum(st.values()) / 60:.0f} min in the run directory's stages ({times} min)"
        + (f", {wall / 60:.0f} min in this invocation" if wall else "")
        + ("" if a["complete"] else "; **the run is incomplete**")
        + ".",
        "",
    ]
    recs = [r for r in result["records"] if r["arch"] == arch]
    for b in result["settings"]["latency"]["backends"]:
        spread = a["pool_spread"].get(b)
        lines += [
            f"**{b}**" + (f" (spread of the pool's calls: {100 * spread:.1f} % median)" if spread else ""),
            "",
            "| method | budget | measured ms | speed-up | accuracy % | Δ vs base | before fine-tune % | params |",
            "|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in recs:
            if "backends" not in r:
                lines.append(f"| {LABELS[r['method']]} | {r['budget']:g} | infeasible |||||")
                continue
            bb, d = r["backends"][b], None
            if r["accuracy_mean"] is not None and base_acc is not None:
                d = r["accuracy_mean"] - base_acc
            lines.append(
                f"| {LABELS[r['method']]} | {r['budget']:g} | {_fmt(bb['ms'], '.3f')} | "
                f"{_fmt(bb['speedup'])} | {_acc(r)} | {_fmt(d, '+.2f')} | "
                f"{_fmt(r.get('accuracy_before_finetune'))} | {r.get('params') or '–'} |"
            )
        lines.append("")
    if a.get("figure"):
        lines += [f"![{arch}: accuracy against measured speed-up]({a['figure']})", ""]
    infeasible = [r["infeasible"] for r in recs if r.get("infeasible")]
    if infeasible:
        lines += ["Not solved: " + "; ".join(infeasible) + ".", ""]
    return lines + _region_lines(result, arch) + _plan_lines(recs) + _corr_lines(result, arch)


def _faster(x, lead) -> str:
    if x and lead and x > 1.03 * lead:
        return f", **but {100 * (x / lead - 1):.0f} % faster than the leader**"
    return ""


def _region_lines(result: dict, arch: str) -> list[str]:
    out = ["Per latency region (budget): who is ahead, by how much against the seeds' spread:", ""]
    for g in result["regions"][arch]:
        behind = "; ".join(
            f"{LABELS[c['method']]} ({_fmt(c['speedup'])}x) {c['gap']:.2f} pp behind, "
            f"{c['verdict']}{_faster(c['speedup'], g['leader_speedup'])}"
            for c in g["behind"]
        )
        out.append(
            f"- budget {g['budget']:g}, {g['backend']}: ahead {LABELS[g['leader']]} "
            f"({_fmt(g['leader_speedup'])}x); {behind or 'no other method'}."
        )
    if result["equal_latency"][arch]:
        out += [
            "",
            "LayerMerge against each baseline at LayerMerge's measured speed-up:",
            "",
            "| backend | budget | speed-up | baseline | LayerMerge % | baseline % (interpolated) | gap pp | pooled SD | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for e in result["equal_latency"][arch]:
            out.append(
                f"| {e['backend']} | {e['budget']:g} | {e['speedup']:.2f} | {LABELS[e['other']]} "
                f"| {e['layermerge']:.2f} | {_fmt(e['other_at_speedup'])} | {e['gap']:+.2f} | "
                f"{_fmt(e['pooled_sd'])} | {e['verdict']} |"
            )
    recs = {(r["method"], r["budget"]): r for r in result["records"] if r["arch"] == arch}
    behind = {(g["budget"], g["leader"]) for g in result["regions"][arch]}
    behind = sorted(x for x in behind if x[1] != "layermerge")
    if behind:
        out += ["", "**Where LayerMerge is not the most accurate at a budget**, from the data:", ""]
        out += ["- " + _explain(recs, frac, leader) for frac, leader in behind]
    return out + [""]


def _explain(recs: dict, frac: float, leader: str) -> str:
    lm, win = recs.get(("layermerge", frac)), recs[(leader, frac)]
    if lm is None or lm.get("accuracy_mean") is None:
        return f"budget {frac:g}: LayerMerge has no fine-tuned plan here."
    text = (
        f"budget {frac:g}: {LABELS[leader]} {_acc(win)} % against LayerMerge {_acc(lm)} %. "
        f"LayerMerge's plan: {describe(lm.get('changes', []))} (objective "
        f"{_fmt(lm.get('objective'), '.3f')}, {_fmt(lm.get('accuracy_before_finetune'))} % "
        "before fine-tuning). "
    )
    if leader == "channelprune":
        text += (
            f"Channel pruning removed a fraction {_fmt(win.get('ratio'), '.3f')} of the channels "
            f"({win.get('params')} parameters against LayerMerge's {lm.get('params')}) and "
            "kept every layer"
        )
    else:
        text += f"{LABELS[leader]}'s plan: {describe(win.get('changes', []))}"
    return text + f" ({_fmt(win.get('accuracy_before_finetune'))} % before fine-tuning)."


def _plan_lines(recs: list[dict]) -> list[str]:
    out = [
        "What each network changed (I: the block's importance, 1 = no change; Δacc: its "
        "holdout accuracy change in points after the importance protocol's short fine-tune):",
        "",
    ]
    for r in recs:
        if r["method"] == "channelprune" and r.get("ratio") is not None:
            out.append(
                f"- channel pruning @ {r['budget']:g}: ratio {r['ratio']:.3f}, "
                f"{r.get('params')} parameters"
            )
        elif "changes" in r:
            out.append(
                f"- {LABELS[r['method']]} @ {r['budget']:g} (objective "
                f"{_fmt(r.get('objective'), '.3f')}): {describe(r['changes'])}"
            )
    return out + [""]


def _corr_lines(result: dict, arch: str) -> list[str]:
    rows = result["objective_correlation"][arch]
    out = [
        "Does the DP objective predict the outcome? Spearman correlation between each "
        "plan's objective and its accuracy drop from the base after fine-tuning (before "
        "it in brackets); a perfect predictor gives -1. With one plan per budget the "
        "ordering mostly follows the budget; with n = 3 only ±1 and ±0.5 occur, and -1 "
        "arises by chance with probability 1/6. Objectives of different methods are sums "
        "over different terms (blocks, or kept and dropped convs) and do not compare.",
        "",
        "| method | plans (distinct) | objectives | drops pp | Spearman (before fine-tune) |",
        "|---|---|---|---|---|",
    ]
    for c in rows:
        out.append(
            f"| {LABELS[c['method']]} | {c['n']} ({c['distinct_plans']}) | "
            + ", ".join(f"{o:.2f}" for o in c["objective"])
            + " | "
            + ", ".join(f"{d:.2f}" for d in c["drop"])
            + f" | {_fmt(c['spearman'])} ({_fmt(c['spearman_before_finetune'])}) |"
        )
    return out + [""] if rows else []


# ------------------------------------------------------------------------ main


def analyse(args, s: dict, wd: Path, doc: Path) -> dict:
    import onnxruntime
    import torch

    result = {
        "run": args.mode,
        "flags": (f" --threads {args.threads}" if args.threads else "")
        + ("" if args.archs == list(ARCHS) else f" --archs {','.join(args.archs)}"),
        "settings": s,
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} training threads), onnxruntime {onnxruntime.__version__}",
        "archs": {},
        "records": [],
        "regions": {},
        "equal_latency": {},
        "objective_correlation": {},
    }
    backends = s["latency"]["backends"]
    for arch in args.archs:
        a, rd, s = ARCHS[arch], wd / arch, arch_settings(arch, result["settings"])
        rep = json.loads((rd / "report.json").read_text()) if (rd / "report.json").exists() else {}
        complete = report_is_current(rep, s)
        rep = rep if complete else rows_from_cache(rd, s)
        base_acc = rep["base"].get("accuracy")
        recs = records_of(arch, rep, s, rd, conv_names(a), importance_tables(rd))
        pool = rep.get("timing_pool") or {}
        res = {
            "model": a["model"],
            "model_kwargs": a["model_kwargs"],
            "train": s.get("train") or a["train"],
            "budgets": s["budgets"],
            "run_dir": str(rd),
            "complete": complete,
            "base_accuracy": base_acc,
            "base_ok": base_acc is not None and base_acc >= MIN_BASE_ACC,
            "base_ms": rep["base"].get("latency_ms") or {},
            "pool_spread": {b: p.get("spread_median") for b, p in pool.items()},
            "importance": rep.get("importance"),
            "stage_seconds": stage_seconds(rd),
            "wall_s_this_invocation": args.wall.get(arch),
            "notes": rep.get("notes", []),
        }
        if base_acc is not None:
            png = doc.parent / "methods" / f"{arch}.png"
            res["figure"] = _rel(figure(arch, {**res, "records": recs}, backends, png), doc.parent)
        result["archs"][arch] = res
        result["records"] += recs
        result["regions"][arch] = regions(recs, s["budgets"], backends)
        ok = base_acc is not None
        result["equal_latency"][arch] = equal_latency(recs, base_acc, backends) if ok else []
        result["objective_correlation"][arch] = objective_correlation(recs, base_acc) if ok else []
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="default /tmp/lm-methods[-quick]")
    ap.add_argument("--quick", action="store_true", help="tiny settings, a few minutes")
    ap.add_argument(
        "--partial", action="store_true", help="run nothing: report what the workdir holds so far"
    )
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from ARCHS")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seeds", type=int, default=None, help="fine-tunes per network")
    ap.add_argument("--budgets", type=lambda t: [float(x) for x in t.split(",")], default=None)
    ap.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write docs/methods.md, docs/methods/*.png and docs/bench_methods[_partial].json "
        "(default: yes, except with --quick, which writes them into the workdir)",
    )
    args = ap.parse_args()
    args.archs = [x for x in args.archs.split(",") if x]
    if any(x not in ARCHS for x in args.archs):
        ap.error(f"--archs: choose from {list(ARCHS)}")
    s = copy.deepcopy(QUICK if args.quick else FULL)
    s.update({k: getattr(args, k) for k in ("seeds", "budgets") if getattr(args, k) is not None})
    args.mode = "quick" if args.quick else "partial" if args.partial else "full"
    wd = args.workdir or Path("/tmp/lm-methods" + ("-quick" if args.quick else ""))
    wd.mkdir(parents=True, exist_ok=True)
    data = subset_data(wd, *s["subset"]) if s["subset"] else "fashion-mnist"
    args.wall, t_start = {}, time.time()
    for arch in [] if args.partial else args.archs:
        cfg = compress_config(ARCHS[arch], arch_settings(arch, s), data, args.threads)
        args.wall[arch] = round(run_arch(arch, cfg, wd / arch), 1)
        acc = json.loads((wd / arch / "report.json").read_text())["base"]["accuracy"]
        print(f"[{arch}] base test accuracy {acc:.2f} % ({args.wall[arch]:.0f} s)", flush=True)
        if not args.quick and acc < MIN_BASE_ACC:
            print(f"warning: {arch}: base accuracy below {MIN_BASE_ACC:g} %", file=sys.stderr)
    docs = args.docs if args.docs is not None else not args.quick
    doc = DOC if docs else wd / "methods.md"
    result = analyse(args, s, wd, doc)
    result["wall_s"] = round(time.time() - t_start, 1)
    if args.mode == "full" and not all(a["complete"] for a in result["archs"].values()):
        print("a run is incomplete: nothing written (--partial reports it)", file=sys.stderr)
        return 1
    suffix = "" if args.mode == "full" else "_" + args.mode
    path = doc.parent / f"bench_methods{suffix}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if not doc.exists():
        doc.write_text("# Comparing compression methods\n")
    write_section(HEADING, section(result, path), doc)
    print(doc)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
