"""Does re-ranking help? The solver's K best Pareto-optimal plans per budget, each
fine-tuned briefly as a whole plan and scored on the importance table's holdout-val
split, against the solver's own pick, for LayerMerge and layer pruning.

It reuses the run directories of ``benchmarks/bench_methods.py`` (run that first):
per architecture the run directory is copied to ``ARCH-rerankK-sN`` (base network,
latency and importance tables, fine-tunes of plans that do not change are all
cached there) and ``compress`` runs again with ``solve.rerank: K`` and
``solve.rerank_steps: N``. Plans that re-ranking changes are fine-tuned with the
same recipe and seeds as in the comparison run and timed in the variant's own pool
(the base network included, so speed-ups compare).

It writes the "Re-ranking" section of docs/methods.md and docs/bench_rerank.json
(the path printed last): per method and budget the accuracy (mean ± SD over seeds)
with and without re-ranking, whether the plan changed, its cost, and how well the
solver's objective ranks the candidates against their short whole-plan fine-tune
(Spearman per budget).

    nice -n 19 .venv/bin/python benchmarks/bench_rerank.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import write_section  # noqa: E402
from bench_importance_protocols import spearman  # noqa: E402
from bench_methods import (  # noqa: E402
    ARCHS,
    DOC,
    FULL,
    QUICK,
    ROOT,
    _fmt,
    _rel,
    arch_settings,
    compress_config,
    pooled_sd,
    run_arch,
    subset_data,
    verdict,
)

HEADING = "## Re-ranking"
METHODS = ["layermerge", "layerprune"]
LABELS = {"layermerge": "LayerMerge", "layerprune": "layer pruning"}


def variant_dir(wd: Path, arch: str, k: int, steps: int) -> Path:
    """The comparison run's directory copied (once) to the re-ranking variant's."""
    src, dst = wd / arch, wd / f"{arch}-rerank{k}-s{steps}"
    if not (src / "report.json").exists():
        raise SystemExit(f"{src}: no finished run; run benchmarks/bench_methods.py first")
    if not dst.exists():
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
        tmp.rename(dst)
    return dst


def _row(rep: dict, method: str, frac: float) -> dict | None:
    for r in rep.get("rows", []):
        if r["method"] == method and r["budget_frac"] == frac:
            return r
    return None


def _point(r: dict | None, backend: str) -> dict:
    if r is None:
        return {"accuracy_mean": None}
    return {
        "digest": r.get("digest"),
        "objective": r.get("objective"),
        "seeds": r.get("seeds"),
        "accuracy_mean": r.get("accuracy_mean"),
        "accuracy_std": r.get("accuracy_std"),
        "accuracy_by_seed": r.get("accuracy_by_seed"),
        "speedup": (r.get("speedup_by_backend") or {}).get(backend),
    }


def compare(arch: str, base: dict, var: dict, budgets: list[float], backend: str) -> list[dict]:
    """One record per method and budget: the solver's pick against the re-ranked one."""
    out = []
    for m in METHODS:
        for frac in budgets:
            a, b = _row(base, m, frac), _row(var, m, frac)
            rec = {"arch": arch, "method": m, "budget": frac, "backend": backend}
            rec["solver"], rec["reranked"] = _point(a, backend), _point(b, backend)
            rr = (b or {}).get("rerank") or {}
            cands = rr.get("candidates") or []
            rec["candidates"] = [
                {k: c.get(k) for k in ("digest", "objective", "predicted_ms", "score")}
                for c in cands
            ]
            rec["chosen"], rec["rerank_seconds"] = rr.get("chosen"), rr.get("seconds")
            rec["changed"] = bool(rr.get("differs"))
            obj = [c["objective"] for c in cands]
            score = [c["score"] for c in cands]
            rec["spearman_objective_score"] = (
                spearman(obj, score) if len(cands) > 2 and len(set(score)) > 1 else math.nan
            )
            if (
                a
                and b
                and a.get("accuracy_mean") is not None
                and b.get("accuracy_mean") is not None
            ):
                gap = b["accuracy_mean"] - a["accuracy_mean"]
                sd = pooled_sd(a, b)
                rec.update(
                    gap=gap,
                    pooled_sd=sd,
                    verdict=verdict(gap, sd) if rec["changed"] else "same plan",
                )
            out.append(rec)
    return out


def section(result: dict, json_path: Path) -> str:
    k, steps = result["k"], result["steps"]
    lines = [
        HEADING,
        "",
        f"Produced by `nice -n 19 .venv/bin/python benchmarks/bench_rerank.py --k {k} "
        f"--steps {steps}{result['flags']}` after the comparison above.",
        "",
        f"`solve: {{rerank: {k}, rerank_steps: {steps}}}`: per budget the solver returns its "
        f"{k} best Pareto-optimal plans within the budget; each is fine-tuned for {steps} steps "
        "(the fine-tune recipe, on the importance table's holdout-train split) and scored by "
        "its accuracy on the holdout-val split, and the best is kept. The kept plan is then "
        "fine-tuned with the same recipe and seeds as in the comparison. A plan re-ranking "
        "does not change keeps its fine-tunes. Speed-ups: each from its run's own pool (base "
        "network included).",
        "",
    ]
    for arch, recs in result["archs"].items():
        lines += [
            f"### {arch}",
            "",
            f"| method | budget | solver's plan % | re-ranked % | changed | gap pp | verdict | speed-up ({result['backend']}) solver → re-ranked | cost s | Spearman objective vs score |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in recs:
            a, b = r["solver"], r["reranked"]

            def acc(p):
                if p.get("accuracy_mean") is None:
                    return "–"
                return f"{p['accuracy_mean']:.2f} ± {p.get('accuracy_std') or 0:.2f}"

            lines.append(
                f"| {LABELS[r['method']]} | {r['budget']:g} | {acc(a)} | {acc(b)} | "
                f"{'yes' if r['changed'] else 'no'} | {_fmt(r.get('gap'), '+.2f')} | "
                f"{r.get('verdict', '–')} | {_fmt(a.get('speedup'))} → {_fmt(b.get('speedup'))} | "
                f"{_fmt(r.get('rerank_seconds'), '.0f')} | {_fmt(r['spearman_objective_score'])} |"
            )
        lines.append("")
        lines.append(
            "Candidates (objective: the solver's; score: holdout-val accuracy % after the short fine-tune; * kept):"
        )
        lines.append("")
        for r in recs:
            cs = ", ".join(
                f"{c['objective']:.3f}/{_fmt(c['score'])}" + ("*" if i == r["chosen"] else "")
                for i, c in enumerate(r["candidates"])
            )
            lines.append(f"- {LABELS[r['method']]} @ {r['budget']:g}: {cs or '–'}")
        lines.append("")
    s = result["summary"]
    lines += [
        f"Summary: re-ranking changed {s['changed']} of {s['rows']} plans"
        + (
            f" ({s['without_plan']} budgets below a method's fastest plan had none)"
            if s.get("without_plan")
            else ""
        )
        + "; of the changed "
        f"ones {s['better']} gained and {s['worse']} lost accuracy (mean gap "
        f"{_fmt(s['mean_gap_changed'], '+.2f')} pp; {s['clear_better']} clearly better and "
        f"{s['clear_worse']} clearly worse at twice the pooled SD). Median Spearman of the "
        f"objective with the candidates' scores: {_fmt(s['median_spearman'])} (1: the "
        "objective orders the candidates as their short fine-tunes do). Cost: at most "
        f"{k} x {steps} = {k * steps} fine-tuning steps per method and budget, beside the "
        f"{result['finetune_steps']} x {result['seeds']} of the kept plan's fine-tunes; the "
        "`cost s` column is the wall time of the re-ranking stage on a machine shared with "
        f"other jobs ({s['rerank_seconds'] / 60:.0f} min in all), which says little about the "
        "cost on a machine of one's own.",
        "",
        f"JSON: `{_rel(json_path, ROOT)}`.",
    ]
    return "\n".join(lines) + "\n"


def summary(recs: list[dict]) -> dict:
    changed = [r for r in recs if r["changed"] and r.get("gap") is not None]
    rhos = [r["spearman_objective_score"] for r in recs]
    rhos = [x for x in rhos if not math.isnan(x)]
    # a budget below a method's fastest plan has no plan to re-rank (no candidates)
    planned = [r for r in recs if r["candidates"]]
    return {
        "rows": len(planned),
        "without_plan": len(recs) - len(planned),
        "changed": sum(r["changed"] for r in recs),
        "better": sum(r["gap"] > 0 for r in changed),
        "worse": sum(r["gap"] < 0 for r in changed),
        "clear_better": sum(r["gap"] > 2 * r["pooled_sd"] for r in changed),
        "clear_worse": sum(r["gap"] < -2 * r["pooled_sd"] for r in changed),
        "mean_gap_changed": statistics.fmean(r["gap"] for r in changed) if changed else None,
        "median_spearman": statistics.median(rhos) if rhos else None,
        "rerank_seconds": sum(r.get("rerank_seconds") or 0 for r in recs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="default /tmp/lm-methods[-quick]")
    ap.add_argument("--quick", action="store_true", help="on bench_methods.py --quick's runs")
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--k", type=int, default=4, help="candidates per budget")
    ap.add_argument("--steps", type=int, default=100, help="fine-tune steps per candidate")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--docs", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="JSON",
        help="only rewrite the summary and the section from an earlier run's JSON",
    )
    args = ap.parse_args()
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        result["summary"] = summary([r for recs in result["archs"].values() for r in recs])
        args.from_json.write_text(json.dumps(result, indent=1, default=str) + "\n")
        doc = args.from_json.with_name("methods.md")
        write_section(HEADING, section(result, args.from_json), doc)
        print(doc)
        print(args.from_json)
        return 0
    settings = QUICK if args.quick else FULL
    args.workdir = args.workdir or Path("/tmp/lm-methods" + ("-quick" if args.quick else ""))
    data = subset_data(args.workdir, *settings["subset"]) if settings["subset"] else "fashion-mnist"
    t0, archs = time.time(), [a for a in args.archs.split(",") if a]
    result = {"k": args.k, "steps": args.steps, "backend": FULL["latency"]["backends"][0],
              "flags": (" --quick" if args.quick else "") + (f" --threads {args.threads}" if args.threads else ""), "archs": {}}  # fmt: skip
    for arch in archs:
        s = arch_settings(arch, settings)
        rd = variant_dir(args.workdir, arch, args.k, args.steps)
        cfg = compress_config(ARCHS[arch], s, data, args.threads)
        cfg["solve"] = {"methods": METHODS, "budgets": s["budgets"], "rerank": args.k,
                        "rerank_steps": args.steps}  # fmt: skip
        run_arch(f"{arch}+rerank", cfg, rd)
        base = json.loads((args.workdir / arch / "report.json").read_text())
        var = json.loads((rd / "report.json").read_text())
        result["archs"][arch] = compare(arch, base, var, s["budgets"], result["backend"])
    result["wall_s"] = round(time.time() - t0, 1)
    result["finetune_steps"], result["seeds"] = settings["finetune"]["steps"], settings["seeds"]
    result["summary"] = summary([r for recs in result["archs"].values() for r in recs])
    docs = args.docs if args.docs is not None else not args.quick
    doc = DOC if docs else args.workdir / "methods.md"
    path = doc.parent / "bench_rerank.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    write_section(HEADING, section(result, path), doc)
    print(doc)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
