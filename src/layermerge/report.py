"""Reports: Markdown + ``report.json`` + PNG figures from measured results.

The report holds numbers the pipeline measured and nothing else: the base
network (its quality, measured latency per backend) and one row per method and
budget (predicted and measured latency, speed-up, quality, parameters, kept
activations, kept and merged convs). The quality columns are the task's
(``report["metrics"]``: top-1 accuracy by default, FID and holdout loss for
diffusion); a task adds its own sections (``report["sections"]``). Figures: the
first quality metric against measured speed-up for every method, the solver's
trade-off curves with the chosen points, and a picture of the chain showing, per
plan, what was kept, pruned and merged.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chain import Chain
from .plan import Plan

REPORT_SCHEMA = 1
#: the quality columns when a report names none: top-1 accuracy
DEFAULT_METRICS = ({"key": "accuracy", "label": "accuracy %", "digits": 2, "delta": "Δacc"},)
METHOD_LABELS = {
    "layermerge": "LayerMerge",
    "kim23": "activation removal only (Kim et al. 2023)",
    "layerprune": "layer pruning only",
    "layermerge-drop": "LayerMerge + drops",
    "channelprune": "channel pruning (torch-pruning, L1 magnitude)",
}


#: the main table's columns of what a plan does, when ``report["plan_structure"]``
STRUCTURE_KEYS = ("merged_spans", "pruned_convs", "dropped_upsampling_convs")
STRUCTURE_COLUMNS = ["merged spans", "pruned convs", "dropped up-sampling convs"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metrics(report: dict) -> list[dict]:
    return list(report.get("metrics") or DEFAULT_METRICS)


def plot_quality_vs_speedup(report: dict, path: Path, backend: str) -> Path:
    """The report's first quality metric against the measured speed-up (the rows'
    ``report["speedup_key"]``, default ``speedup``: one forward pass on ``backend``),
    with error bars of one SD over the fine-tuning seeds."""
    metric = _metrics(report)[0]
    key = metric["key"]
    sx = report.get("speedup_key") or "speedup"
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    base = report["base"]
    if base.get(key) is not None:
        ax.scatter([1.0], [base[key]], color="black", marker="*", s=120, label="base")
    for method in sorted({r["method"] for r in report["rows"]}):
        rows = sorted(
            (
                r
                for r in report["rows"]
                if r["method"] == method and r.get(sx) and r.get(key) is not None
            ),
            key=lambda r: r[sx],
        )
        if rows:
            errors = [r.get(f"{key}_std") or 0.0 for r in rows]
            seeds = max(r.get("seeds") or 1 for r in rows)
            ax.errorbar(
                [r[sx] for r in rows],
                [r[key] for r in rows],
                yerr=errors if seeds > 1 else None,
                fmt="o-",
                capsize=3,
                label=METHOD_LABELS.get(method, method)
                + (f" (mean ± SD, {seeds} seeds)" if seeds > 1 else ""),
            )
    ax.set_xlabel(report.get("speedup_label") or f"measured speed-up ({backend})")
    ax.set_ylabel(metric.get("label", key))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


plot_accuracy_vs_speedup = plot_quality_vs_speedup


def plot_tradeoff(curves: dict[str, dict], report: dict, path: Path) -> Path:
    """``curves[method] = {"budget_ms": [...], "objective": [...]}`` (the solver frontier)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method, c in sorted(curves.items()):
        line = ax.step(
            c["budget_ms"], c["objective"], where="post", label=METHOD_LABELS.get(method, method)
        )
        pts = [r for r in report["rows"] if r["method"] == method]
        ax.scatter(
            [r["predicted_ms"] for r in pts],
            [r["objective"] for r in pts],
            color=line[0].get_color(),
            zorder=3,
        )
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("objective (sum of block importances)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_chain(chain: Chain, plans: Sequence[tuple[str, Plan]], path: Path) -> Path:
    """One row per plan: a cell per conv, coloured kept / pruned; a thick line at
    every block boundary (a kept activation), thin dashes at breaks."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    L = chain.length
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * L + 2.5), 0.45 * len(plans) + 1.2))
    for row, (label, plan) in enumerate(plans):
        y = len(plans) - 1 - row
        kept = set(plan.kept_convs)
        for i in range(1, L + 1):
            color = "#3b7dd8" if i in kept else "#e8e8e8"
            ax.add_patch(Rectangle((i - 1, y + 0.1), 1, 0.8, facecolor=color, edgecolor="white"))
        for b in plan.blocks:
            if b.length > 1:
                ax.add_patch(
                    Rectangle(
                        (b.start, y + 0.1),
                        b.length,
                        0.8,
                        fill=False,
                        edgecolor="#d9822b",
                        linewidth=1.5,
                    )
                )
            if b.activation:
                ax.plot([b.end, b.end], [y + 0.05, y + 0.95], color="black", linewidth=1.6)
        ax.text(-0.5, y + 0.5, label, ha="right", va="center", fontsize=8)
    for b in chain.breaks:
        ax.axvline(b, color="red", linestyle=":", linewidth=0.8)
    ax.set_xlim(-0.2, L + 0.2)
    ax.set_ylim(0, len(plans))
    ax.set_yticks([])
    ax.set_xlabel("conv index")
    ax.set_title(
        "blue: kept conv, grey: pruned, orange box: merged block,\n"
        "black bar: kept activation, red dots: break",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


#: what each shipped file is, in the order the report lists them
FILE_KINDS = {
    "card": "model card",
    "onnx": "ONNX",
    "pt2": "torch.export program",
    "torchscript": "TorchScript",
    "weights": "safetensors weights",
    "plan": "plan",
    "pruning": "pruning ratio",
    "meta": "model.json",
}


def _files_section(report: dict) -> list[str]:
    """One line per plan folder, linking every file in it."""
    rows = [r for r in report["rows"] if r.get("files")]
    if not rows:
        return []
    lines = [
        "## Files to ship",
        "",
        "One folder per plan (load one with `layermerge.load_shipped(folder)`):",
        "",
    ]
    for r in rows:
        files = r["files"]
        folder = files["card"].rsplit("/", 1)[0] if "/" in files.get("card", "") else ""
        links = [f"[{FILE_KINDS.get(k, k)}]({files[k]})" for k in FILE_KINDS if k in files]
        lines.append(
            f"- {r['method']} at {_fmt(r['budget_frac'])}: `{folder}/`: " + ", ".join(links)
        )
    lines.append("")
    return lines


def markdown(report: dict, figures: dict[str, str]) -> str:
    base = report["base"]
    metrics = _metrics(report)
    backends = list(base["latency_ms"])
    lines = [f"# layermerge report: {report['model']}", ""]
    if report.get("smoke"):
        lines += [
            "**Smoke run** (`layermerge compress --smoke`): the config was shrunk by its "
            "`smoke:` section to check that every stage works. The numbers below say "
            "nothing about the method.",
            "",
        ]
    lines += [
        f"Data: `{report.get('data')}`; input {report.get('input_shape')}; "
        f"primary backend for the solver: {report.get('primary_backend')}.",
        "Every number below was measured by this run.",
    ]
    if report.get("budgets_are"):
        lines.append(f"Budgets: {report['budgets_are']}.")
    lines += ["", "## Base network", ""]
    for m in metrics:
        unit = " %" if m["key"] == "accuracy" else ""
        name = "accuracy" if m["key"] == "accuracy" else m.get("label", m["key"])
        lines.append(f"- {name}: {_fmt(base.get(m['key']), m.get('digits', 2))}{unit}")
    for b in backends:
        lines.append(f"- latency ({b}, BN folded): {_fmt(base['latency_ms'][b], 3)} ms")
    lines.append(f"- parameters: {base.get('params')}")
    norm = base.get("normalization")
    if norm:
        lines.append(
            f"- inputs normalised with mean {norm['mean']}, std {norm['std']} ({norm['from']})"
        )
    lines += _importance_lines(report.get("importance"))
    lines += ["", "## Compressed networks", ""]
    lines += _pool_lines(report.get("timing_pool"))
    seeds = max([r.get("seeds") or 1 for r in report["rows"]] or [1])
    if seeds > 1:
        lines += [
            f"Quality: mean ± SD over {seeds} fine-tunes of each plan with different seeds; "
            "the shipped network of a plan is its seed of median "
            f"{metrics[0].get('label', metrics[0]['key']).removesuffix(' %')}.",
            "",
        ]
    head = ["method", "budget", "predicted ms"]
    head += [f"{b} ms" for b in backends] + [f"speed-up {b}" for b in backends]
    for m in metrics:
        head.append(m.get("label", m["key"]))
        if m.get("delta"):
            head.append(m["delta"])
    structure = bool(report.get("plan_structure"))
    head += ["params", "activations", "convs kept"]
    # what each plan does: merged spans, pruned convs, dropped up-sampling convs
    head += STRUCTURE_COLUMNS if structure else ["blocks merged"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in report["rows"]:
        cells = [METHOD_LABELS.get(r["method"], r["method"]), _fmt(r["budget_frac"])]
        cells.append(_fmt(r["predicted_ms"], 3))
        cells += [_fmt(r["measured_ms_by_backend"].get(b), 3) for b in backends]
        cells += [_fmt(r["speedup_by_backend"].get(b)) for b in backends]
        for m in metrics:
            v, nd = r.get(m["key"]), m.get("digits", 2)
            std = r.get(f"{m['key']}_std")
            if (r.get("seeds") or 1) > 1 and std is not None:
                cells.append(f"{_fmt(v, nd)} ± {_fmt(std, nd)}")
            else:
                cells.append(_fmt(v, nd))
            if m.get("delta"):
                b0 = base.get(m["key"])
                cells.append(_fmt(None if v is None or b0 is None else v - b0, nd))
        kept = r.get("kept_convs")
        cells += [
            _fmt(r.get("params")),
            _fmt(r.get("kept_activations")),
            "–" if kept is None else f"{kept}/{report['chain_length']}",
        ]
        if structure:
            cells += [_fmt(r.get(k)) for k in STRUCTURE_KEYS]
        else:
            cells.append(_fmt(r.get("merged_blocks")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if report.get("quality_caveats"):  # what the quality numbers do not say
        lines += ["What the quality numbers can be compared with:", ""]
        lines += [f"- {c}" for c in report["quality_caveats"]] + [""]
    lines += _network_lines(report)
    lines += _rerank_lines(report)
    lines += _files_section(report)
    first = metrics[0].get("label", metrics[0]["key"]).removesuffix(" %")
    against = "measured sampling speed-up" if report.get("speedup_key") else "measured speed-up"
    for title, key in (
        (f"{first[:1].upper()}{first[1:]} against {against}", "quality_vs_speedup"),
        ("Solver trade-off curves", "tradeoff"),
        ("What each plan keeps", "chain"),
    ):
        if key in figures:
            lines += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    for sec in report.get("sections", ()):
        lines += [f"## {sec['title']}", "", sec["text"], ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _network_lines(report: dict) -> list[str]:
    """How the channel-pruned rows met their budgets (a ratio found by measuring)."""
    rows = [r for r in report["rows"] if r.get("kind") == "network"]
    if not rows:
        return []
    lines = [
        f"{METHOD_LABELS['channelprune']}: the fraction of channels pruned was bisected "
        "until the pruned network (BatchNorm folded) measured within the budget on "
        f"{report.get('primary_backend')}, each candidate timed interleaved with the base "
        "network; no latency table predicts it, and it keeps every layer "
        "(activations, convs kept and blocks merged do not apply).",
        "",
        "| budget | pruned ratio | measured in the search (ms) | budget (ms) | within |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        within = (r.get("search") or {}).get("within_budget")
        lines.append(
            f"| {_fmt(r['budget_frac'])} | {_fmt(r.get('ratio'), 3)} | "
            f"{_fmt(r.get('search_ms'), 3)} | {_fmt(r.get('budget_ms'), 3)} | "
            f"{'yes' if within else 'no'} |"
        )
    return [*lines, ""]


def _rerank_lines(report: dict) -> list[str]:
    """Per re-ranked row: the candidates scored, whether the choice differs from the
    solver's top plan, and the cost."""
    rows = [r for r in report["rows"] if r.get("rerank")]
    if not rows:
        return []
    rr = rows[0]["rerank"]
    lines = [
        f"Re-ranking: the solver's best Pareto-optimal plans within each budget (up to "
        f"{rr['k']}) were each fine-tuned for {rr['steps']} steps and scored by "
        f"{rr['metric']} on the {rr['split']} split; the best became the row's plan.",
        "",
    ]
    for r in rows:
        rr = r["rerank"]
        n, chosen = len(rr["candidates"]), rr["candidates"][rr["chosen"]]
        what = (
            f"chose candidate {rr['chosen'] + 1} (objective {_fmt(chosen['objective'], 4)} "
            f"against the solver's {_fmt(rr['dp_objective'], 4)}), not the solver's top plan"
            if rr["differs"]
            else "kept the solver's top plan"
        )
        if n == 1:
            what = "the only plan within the budget, not fine-tuned"
        scores = ", ".join(_fmt(c["score"], 3) for c in rr["candidates"])
        lines.append(
            f"- {METHOD_LABELS.get(r['method'], r['method'])} at {_fmt(r['budget_frac'])}: "
            f"{n} candidate{'s' * (n != 1)} scored ({scores}); {what}; "
            f"{_fmt(rr['seconds'], 1)} s"
        )
    return [*lines, ""]


def _pool_lines(pools: dict | None) -> list[str]:
    """How the latencies were measured: one interleaved pool per backend."""
    if not pools:
        return []
    parts = []
    for b, p in pools.items():
        spread = ""
        if p.get("spread_median") is not None:
            spread = (
                f"; spread of the calls (IQR / median) {100 * p['spread_median']:.1f} % "
                f"median, {100 * p['spread_max']:.1f} % at most"
            )
        parts.append(
            f"{b}: {p['networks']} networks, {p['rounds']} rounds of {p['calls_per_round']} "
            f"calls each, the {p['statistic']} per network{spread}"
        )
    return [
        "Every latency below, the base network's included, was measured in one "
        "interleaved pool per backend (all networks in one process, each round running "
        "every network in alternating order), so any two rows compare: " + "; ".join(parts) + ".",
        "",
    ]


def _g(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}"


def _importance_lines(imp: dict | None) -> list[str]:
    """The importance table's noise floor: how far apart its options' scores are
    against how far apart the unmodified network's own measurements are."""
    if not imp:
        return []
    lines = ["", "## Importance table", ""]
    lines.append(
        f"Protocol `{imp.get('protocol')}`, score `{imp.get('score')}`, "
        f"{imp.get('entries')} options."
    )
    if not imp.get("calibration_seeds") or imp.get("noise_floor") is None:
        lines.append("No calibration entries: the table's noise floor was not measured.")
        return lines
    lines.append(
        f"Noise floor (SD of {imp['calibration_seeds']} runs of the protocol on the "
        f"unmodified network): {imp['noise_floor']:.4g}; spread of the options' "
        f"scores (SD): {_g(imp.get('spread'))}."
    )
    if imp.get("within_noise"):
        lines.append(
            "**The options' scores are within twice the noise floor: the table barely "
            "ranks them, and the plans it selects are close to arbitrary.** Use a longer "
            "protocol, larger holdout splits or the `kl` score."
        )
    return lines


def write_report(
    out_dir: str | Path,
    report: dict,
    *,
    chain: Chain | None = None,
    plans: Sequence[tuple[str, Plan]] = (),
    curves: dict | None = None,
) -> Path:
    """Write ``report.json``, ``report.md`` and the figures into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"schema": REPORT_SCHEMA, **report}
    figures: dict[str, str] = {}
    primary = report.get("primary_backend") or next(iter(report["base"]["latency_ms"]))
    try:
        _plt()
        plots = True
    except ImportError:  # the figures need matplotlib; the tables and files do not
        plots = False
        report["notes"] = list(report.get("notes") or []) + [
            "no figures: they need matplotlib (pip install 'layermerge[report]')"
        ]
    if plots and report["rows"]:
        name = f"{_metrics(report)[0]['key']}_vs_speedup.png"
        figures["quality_vs_speedup"] = plot_quality_vs_speedup(report, out / name, primary).name
    if plots and curves:
        figures["tradeoff"] = plot_tradeoff(curves, report, out / "tradeoff.png").name
    if plots and chain is not None and plans:
        figures["chain"] = plot_chain(chain, plans, out / "chain.png").name
    report["figures"] = figures
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, figures))
    return out / "report.md"
