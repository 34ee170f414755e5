"""The diffusion task's part of a compress report: fields and Markdown sections.

What :meth:`~layermerge.pipeline.hooks.DiffusionHooks.report_extras` adds to the
report that :func:`layermerge.report.write_report` writes:

- the quality figure's x axis: the measured speed-up of whole DDIM sampling runs
  (``speedup_key: sampling_speedup``) instead of the speed-up of one forward pass;
- per row, the sampling times of every backend, and what the plan does (merged
  spans, pruned convs, dropped up-sampling convs, shown in the main table); a
  LayerMerge plan that merges no span is marked ``acts_as: layer pruning`` and
  the report says so;
- the caveats of the quality metric (``quality_caveats``, listed under the main
  table), a table of the sampling times, and the sample grids as images.
"""

from __future__ import annotations

from typing import Any

from ..report import METHOD_LABELS
from .config import CompressConfig


def _label(row: dict[str, Any]) -> str:
    return f"{METHOD_LABELS.get(row['method'], row['method'])} at {row['budget_frac']:g}"


def quality_caveats(cfg: CompressConfig, feature_space: str | None) -> list[str]:
    """What the quality numbers of a run can and cannot be compared with."""
    q = cfg.quality
    out = []
    if q.features == "inception":
        out.append(
            "FID uses Inception features, but papers report it for 50,000 samples "
            "against the whole training set; it is comparable with their numbers only "
            "at that sample size and reference."
        )
    else:
        out.append(
            f"FID uses the penultimate-layer features of a classifier trained on "
            f"`{cfg.data}` ({feature_space or 'classifier features'}). It ranks the "
            "networks of this run, sampled on the same data with the same settings, "
            "against each other; it is not comparable with the Inception FIDs that papers "
            "report, nor between datasets or feature classifiers."
        )
    out.append(
        "KID (x1e3 in the tables) is the unbiased squared MMD between the same features "
        "with a cubic polynomial kernel: unlike FID it has no bias from the number of "
        "samples, so small sample counts compare, and it can be slightly negative when "
        "two sets are alike. Each network's FID and KID also carry a bootstrap SD over "
        "its own samples (`fid_sampling_sd`, `kid_x1e3_sampling_sd` in report.json): "
        "the sampling noise of the metric, which the SD over fine-tuning seeds leaves out."
    )
    out.append(
        f"With {q.n} samples per network FID is biased upward (the estimate of the "
        "samples' covariance adds to it, the more so the fewer samples) and noisy: "
        "compare numbers at the same number of samples, DDIM steps and seed only. Every "
        f"network is sampled from the same initial noise (seed {cfg.seed}), so the SD "
        "over fine-tuning seeds is the spread between fine-tunes, not the sampling "
        "noise of FID itself."
    )
    return out


def merge_costs(table) -> dict[str, Any] | None:
    """How the latency table prices merging: per span whose merged option keeps all
    its convs, the merged entry against the sum of its convs' own entries (each conv
    with its end activation, as the unmodified network runs it). ``None`` without a
    table."""
    if table is None:
        return None
    single: dict[int, float] = {}
    for r in table.rows:
        if r["end"] - r["start"] == 1 and tuple(r["kept_convs"]) == (r["end"],):
            ms = float(r["latency_ms"])
            single[r["end"]] = min(ms, single.get(r["end"], ms))
    ratios = []
    for r in table.rows:
        kept = tuple(r["kept_convs"])
        if len(kept) >= 2 and len(kept) == r["end"] - r["start"]:
            parts = [single.get(c) for c in kept]
            if all(p is not None for p in parts) and sum(parts) > 0:
                ratios.append(float(r["latency_ms"]) / sum(parts))
    return {
        "spans": len(ratios),
        "cheaper": sum(x < 1 for x in ratios),
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
    }


def diffusion_report(cfg: CompressConfig, report: dict[str, Any], table=None) -> None:
    """Add the diffusion fields and sections to ``report`` (in place); ``table``: the
    primary backend's latency table (how it prices merges)."""
    q, b = cfg.quality, cfg.benchmark
    primary = report["primary_backend"]
    base = report["base"]
    report["feature_space"] = base.get("feature_space")
    report["quality_settings"] = {"n": q.n, "steps": q.steps, "features": q.features}
    report["sampling_steps"] = b.sampling_steps
    report["sampling_batch"] = cfg.latency.batch_size
    report["speedup_key"] = "sampling_speedup"
    report["speedup_label"] = (
        f"measured sampling speed-up ({primary}, {b.sampling_steps} DDIM steps, "
        f"batch {cfg.latency.batch_size})"
    )
    report["plan_structure"] = True
    report["merge_costs"] = merge_costs(table)
    report["quality_caveats"] = quality_caveats(cfg, report["feature_space"])
    base.setdefault("samples", "samples_base.png")
    pruning_only = []
    for row in report["rows"]:
        bench = row["benchmarks"]
        row["sampling_s_by_backend"] = {k: v.get("sampling_s") for k, v in bench.items()}
        row["sampling_speedup_by_backend"] = {
            k: v.get("sampling_speedup") for k, v in bench.items()
        }
        row["sampling_speedup"] = row["sampling_speedup_by_backend"][primary]
        if "samples" not in row:  # the grid of the exported seed
            k = (row.get("exported_seed") or cfg.seed) - cfg.seed
            row["samples"] = f"samples_{row['digest']}{f'-s{k}' if k else ''}.png"
        if row["method"] == "layermerge" and row.get("merged_spans") == 0:
            row["acts_as"] = "layer pruning"
            pruning_only.append(row)
    sections = [
        {"title": "Sampling speed", "text": _sampling_text(cfg, report)},
        {"title": "What each plan does", "text": _structure_text(report, pruning_only)},
        {"title": "Samples", "text": _samples_text(report)},
    ]
    report.setdefault("sections", []).extend(sections)


def _sampling_text(cfg: CompressConfig, report: dict[str, Any]) -> str:
    q, b = cfg.quality, cfg.benchmark
    lines = [
        f"Quality: FID and KID of {q.n} DDIM samples ({q.steps} steps) against the test "
        f"split, lower is better; feature space: **{report['feature_space']}**. Holdout loss: "
        "the denoising loss on the holdout-val split with fixed noise.",
        "",
        f"Sampling: whole DDIM runs of {b.sampling_steps} step(s) at batch "
        f"{cfg.latency.batch_size} (the scheduler on the CPU, as in a diffusers "
        "pipeline), timed per backend in one interleaved pool of the base network and "
        f"every plan (each round runs each network once, the order alternating; the "
        f"minimum over {b.rounds} rounds after one untimed run each). The figure plots "
        f"FID against the sampling speed-up on {report['primary_backend']}.",
        "",
        "| method | budget | backend | sampling s (base -> compressed) | sampling speed-up "
        "| forward speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        for backend, m in row["benchmarks"].items():
            lines.append(
                f"| {METHOD_LABELS.get(row['method'], row['method'])} | "
                f"{row['budget_frac']:.2f} | {backend} | "
                f"{m['sampling_baseline_s']:.3f} -> {m['sampling_s']:.3f} | "
                f"{m['sampling_speedup']:.2f}x | {m['speedup']:.2f}x |"
            )
    return "\n".join(lines)


def _structure_text(report: dict[str, Any], pruning_only: list[dict[str, Any]]) -> str:
    lines = [
        "A merged span replaces two or more convs (and the activations between them) by "
        "one conv; a pruned conv is replaced by the identity; a dropped up-sampling conv "
        "leaves only the nearest-neighbour up-sampling.",
        "",
        "| method | budget | merged spans | pruned convs | dropped up-sampling convs |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {METHOD_LABELS.get(row['method'], row['method'])} | "
            f"{row['budget_frac']:.2f} | {row.get('merged_spans')} | "
            f"{row.get('pruned_convs')} | {row.get('dropped_upsampling_convs')} |"
        )
    if pruning_only:
        which = ", ".join(f"{r['budget_frac']:g}" for r in pruning_only)
        lines += [
            "",
            f"**LayerMerge merges no span at budget(s) {which}: those plans only prune "
            "convs and drop up-sampling convs, so there LayerMerge acts as layer "
            "pruning.** The solver found that better for the budget than merging. "
            "Keeping one conv of a span always costs less than merging the span, so a "
            "merge is chosen only where the importance table says it loses much less "
            "than pruning, and where it is cheaper than the unmerged convs.",
        ]
        ev = report.get("merge_costs")
        if ev and ev["spans"]:
            lines[-1] += (
                f" In this run's {report['primary_backend']} latency table (batch "
                f"{report.get('sampling_batch', 1)}) the merged conv of a span is cheaper "
                f"than its unmerged convs with the GroupNorm and activation between them "
                f"in {ev['cheaper']} of {ev['spans']} spans (merged / unmerged: "
                f"{ev['ratio_min']:.2f} to {ev['ratio_max']:.2f})."
            )
        lines[-1] += ' See docs/diffusion.md, "When the solver merges for a UNet".'
    return "\n".join(lines)


def _samples_text(report: dict[str, Any]) -> str:
    seeds = max([r.get("seeds") or 1 for r in report["rows"]] or [1])
    lines = [
        "The first samples of each network's FID set (same initial noise for every "
        "network)" + (", of the exported (median-FID) fine-tuning seed" if seeds > 1 else "") + ".",
        "",
        "**Base network**",
        "",
        f"![samples of the base network]({report['base']['samples']})",
    ]
    seen = set()
    for row in report["rows"]:
        if row["samples"] in seen:
            continue
        seen.add(row["samples"])
        lines += ["", f"**{_label(row)}**", "", f"![samples: {_label(row)}]({row['samples']})"]
    return "\n".join(lines)
