"""The exact solver against the discretised DP it replaced as the default.

    .venv/bin/python benchmarks/bench_solve.py [--repeats 15] [--write-docs] [--json PATH]

Search spaces: the real ResNet-34 (62 blocks / 150 options) and MobileNetV2
(171 / 391) spaces from ``layermerge inspect ... --options-csv`` when that
works, otherwise synthetic spaces with the same counts. Latencies and
importances are synthetic either way (seeded): ResNet-34 about 25 ms in the
chain plus 3 ms outside it, MobileNetV2 about 12 ms plus 2 ms, merged options
costing more with the merged kernel's area.

For budgets of 0.5, 0.7, 0.9, 1.0 and 2.0 times the unmodified network's
latency: the exact solve's time (from a built problem, and from the tables),
the discretised solve's at 100 and 1000 units per ms, and the objective each
gives up against the exact optimum. Also: the straightforward discretised DP
(per-state loops over dictionaries) against the vectorised one, an independent
bracket of the optimum from the discretised DP at 10 000 units per ms (latencies
rounded up: a lower bound; rounded down: an upper bound), and the baselines.
Exits 1 when an exact plan is over budget, a discretised plan beats an exact
one, the bracket misses, or an exact solve takes more than 50 ms.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from layermerge.solve import (
    METHODS,
    InfeasibleBudgetError,
    _reference_dp,
    budget_to_units,
    build_problem,
    solve,
    solve_tables,
)
from layermerge.solve.discrete import _bounds, _dp
from layermerge.tables import KEY_COLUMNS, Table, make_table, read_table, write_table

MODELS = {
    # name: (blocks, options, chain ms, constant ms)
    "resnet34": (62, 150, 25.0, 3.0),
    "mobilenet_v2": (171, 391, 12.0, 2.0),
}
FRACS = (0.5, 0.7, 0.9, 1.0, 2.0)
PRECISIONS = (100.0, 1000.0)  # the discretised solve: the former default and a finer one
BRACKET = 10_000.0
LIMIT_S = 0.050  # the exact solve's time limit, any budget
ROOT = Path(__file__).resolve().parents[1]
JSON_OUT = ROOT / "docs" / "bench_solve.json"


def real_options(name: str, workdir: Path) -> Table | None:
    path = workdir / f"{name}.options.csv"
    cmd = [
        sys.executable,
        "-m",
        "layermerge.cli",
        "inspect",
        f"torchvision:{name}",
        "--options-csv",
        str(path),
    ]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        return read_table(path, "options")
    except Exception as e:  # no torchvision, no space module yet, ...
        print(f"  {name}: real search space unavailable ({type(e).__name__}); using synthetic")
        return None


def synthetic_options(n_blocks: int, n_options: int, seed: int) -> Table:
    """A chain with exactly ``n_blocks`` blocks and ``n_options`` options: every
    single-conv block, then random short spans, options with random kept subsets."""
    rng = np.random.default_rng(seed)
    L = n_blocks // 2
    spans = [(i - 1, i) for i in range(1, L + 1)]
    others = [(s, e) for s in range(L) for e in range(s + 2, min(L, s + 6) + 1)]
    for j in rng.permutation(len(others))[: n_blocks - L]:
        spans.append(others[j])
    rows = []
    for s, e in spans:
        rows.append(
            dict(
                start=s,
                end=e,
                kernel=1 + 2 * (e - s),
                stride=1,
                depthwise=False,
                kept_convs=tuple(range(s + 1, e + 1)),
            )
        )
    while len(rows) < n_options:
        s, e = spans[L + int(rng.integers(len(spans) - L))]
        kept = tuple(c for c in range(s + 1, e + 1) if rng.random() < 0.5) or (e,)
        k = 1 + 2 * len(kept)
        if any((r["start"], r["end"], r["kernel"]) == (s, e, k) for r in rows):
            continue
        rows.append(dict(start=s, end=e, kernel=k, stride=1, depthwise=False, kept_convs=kept))
    return make_table(
        "options", rows, {"model_fingerprint": f"synthetic-{seed}", "chain_length": L}
    )


def synthetic_values(
    options: Table, chain_ms: float, constant_ms: float, seed: int, workdir: Path, name: str
) -> tuple[Table, Table]:
    """Latency and importance tables for ``options``, written and read back as files."""
    rng = np.random.default_rng(seed)
    L = options.chain_length
    # Per node cost scale: activations get cheaper down the network in steps.
    node_scale = np.exp(np.cumsum(rng.normal(0, 0.15, L + 1)))
    lat_rows, imp_rows = [], []
    for r in options.rows:
        area = r["kernel"] ** 2 / 9 * (0.15 if r["depthwise"] else 1.0)
        ms = node_scale[r["start"]] * (0.3 + 0.7 * area) * rng.uniform(0.9, 1.1)
        span = r["end"] - r["start"]
        pruned = span - len(r["kept_convs"])
        delta = -rng.gamma(2.0, 0.4 + 0.8 * pruned + 0.3 * (span - 1))
        key = {c: r[c] for c in (*KEY_COLUMNS, "kept_convs")}
        lat_rows.append(key | {"latency_ms": ms})
        imp_rows.append(key | {"importance": math.exp(delta / 100), "delta_acc": delta})
    base = sum(
        x["latency_ms"]
        for x in lat_rows
        if x["end"] - x["start"] == 1 and x["kept_convs"] == (x["end"],)
    )
    for x in lat_rows:
        x["latency_ms"] *= chain_ms / base
    meta = {
        **{k: options.meta[k] for k in ("model_fingerprint", "chain_length")},
        "constant_ms": constant_ms,
        "backend": "synthetic",
    }
    lat = write_table(workdir / f"{name}.latency.csv", "latency", lat_rows, meta)
    imp = write_table(workdir / f"{name}.importance.csv", "importance", imp_rows, meta)
    return read_table(lat, "latency"), read_table(imp, "importance")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median_time(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        dt, out = timed(fn)
        times.append(dt)
    return statistics.median(times), out


def machine() -> str:
    from _docs import cpu_name

    cpu = cpu_name()
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"
    )


def conv_table(lat: Table) -> Table:
    """Per-conv importances for layerprune (every other conv may be dropped)."""
    return make_table(
        "conv_importance",
        [
            {"conv": i, "importance": math.exp(-1.0 * (i % 5) / 100)}
            for i in range(1, lat.chain_length + 1, 2)
        ],
        lat.meta,
    )


def try_solve(problem, budget):
    """(objective, predicted latency) or None when no plan fits (rounded up)."""
    try:
        sol = solve(problem, budget)
    except InfeasibleBudgetError:
        return None
    return sol.objective, sol.predicted_latency_ms


def bracket(problem_up, budget):
    """Lower and upper bounds on the true optimum from the discretised DP: latencies
    rounded up (every plan it returns fits: a lower bound) and rounded down (every
    plan that fits stays feasible: an upper bound)."""
    down = dataclasses.replace(
        problem_up,
        units=np.floor(problem_up.latency_ms * problem_up.precision).astype(np.int64),
    )
    lo, hi = try_solve(problem_up, budget), try_solve(down, budget)
    return (lo[0] if lo else -math.inf), (hi[0] if hi else -math.inf)


def bench(name, lat, imp, source, repeats, ref_repeats):
    conv = conv_table(lat)
    exact = build_problem("layermerge", lat, imp)
    coarse = {p: build_problem("layermerge", lat, imp, precision=p) for p in PRECISIONS}
    base = exact.base_latency_ms
    rows = []
    for frac in FRACS:
        budget = frac * base
        sol = solve(exact, budget)
        t_exact = median_time(lambda b=budget: solve(exact, b), repeats)[0]
        t_tables = median_time(lambda b=budget: solve_tables(lat, imp, budget_ms=b), repeats)[0]
        row = {
            "frac": frac,
            "budget_ms": budget,
            "exact_ms": t_exact,
            "exact_from_tables_ms": t_tables,
            "objective": sol.objective,
            "latency_ms": sol.predicted_latency_ms,
            "within_budget": sol.predicted_latency_ms <= budget,
            "breakpoints": len(sol.frontier.objective),
            "frontier_points": sol.frontier_points,
        }
        for p, prob in coarse.items():
            got = try_solve(prob, budget)
            row[f"p{p:g}_ms"] = median_time(lambda b=budget, q=prob: try_solve(q, b), repeats)[0]
            row[f"p{p:g}_objective"] = got[0] if got else None
            row[f"p{p:g}_gap"] = sol.objective - got[0] if got else None
            row[f"p{p:g}_not_better"] = got is None or got[0] <= sol.objective + 1e-9
        rows.append(row)
    # The straightforward discretised DP (per-state loops over dictionaries) and the
    # vectorised one at the old default precision, whole curve up to the base latency.
    p100 = coarse[100.0]
    bounds = _bounds(p100)
    T = min(budget_to_units(base - p100.constant_ms, p100.precision), bounds.hi[-1])
    t_ref, (ref_curve, _) = median_time(lambda: _reference_dp(p100, T), ref_repeats)
    t_dp, (D, _) = median_time(lambda: _dp(p100, T, bounds), repeats)
    identical = np.array_equal(np.asarray(ref_curve), D[-1])
    # An independent bracket of the optimum at one budget (10 000 units per ms).
    frac = 0.7
    lo, hi = bracket(build_problem("layermerge", lat, imp, precision=BRACKET), frac * base)
    at = next(r for r in rows if r["frac"] == frac)
    tol = 1e-9 * max(1.0, abs(at["objective"]))
    bracketed = lo - tol <= at["objective"] <= hi + tol
    baselines = {}
    for method in METHODS[1:]:
        prob = build_problem(method, lat, imp, conv)
        prob100 = build_problem(method, lat, imp, conv, precision=100.0)
        out = []
        for f in FRACS:
            b = f * base
            got = try_solve(prob, b)
            old = try_solve(prob100, b)
            out.append(
                {
                    "frac": f,
                    "exact_ms": median_time(lambda b=b, q=prob: try_solve(q, b), repeats)[0],
                    "objective": got[0] if got else None,
                    "within_budget": got is None or got[1] <= b,
                    "p100_objective": old[0] if old else None,
                    "p100_not_better": old is None or (got is not None and old[0] <= got[0] + 1e-9),
                }
            )
        baselines[method] = out
    return {
        "name": name,
        "source": source,
        "L": exact.chain_length,
        "blocks": len({(r["start"], r["end"]) for r in lat.rows}),
        "options": len(lat),
        "base_ms": base,
        "rows": rows,
        "ref_units": T,
        "ref_ms": t_ref,
        "dp100_ms": t_dp,
        "ref_identical": identical,
        "bracket": {"frac": frac, "precision": BRACKET, "lower": lo, "upper": hi, "ok": bracketed},
        "baselines": baselines,
    }


def _ms(x):
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.1f} s"


def _gap(r, p):
    g = r[f"p{p:g}_gap"]
    return "infeasible" if g is None else f"{g:+.4f}".replace("+", "") if g else "0"


def ok(results) -> list[str]:
    """What failed, if anything."""
    bad = []
    for r in results:
        for row in r["rows"]:
            if not row["within_budget"]:
                bad.append(f"{r['name']} at {row['frac']}: exact plan over budget")
            if not all(row[f"p{p:g}_not_better"] for p in PRECISIONS):
                bad.append(f"{r['name']} at {row['frac']}: a discretised plan beats the exact one")
            if row["exact_ms"] > LIMIT_S:
                bad.append(f"{r['name']} at {row['frac']}: exact solve {_ms(row['exact_ms'])}")
        if not r["ref_identical"]:
            bad.append(f"{r['name']}: dictionary and vectorised discretised DPs differ")
        if not r["bracket"]["ok"]:
            bad.append(f"{r['name']}: exact optimum outside the 1/{BRACKET:g} ms bracket")
        for method, out in r["baselines"].items():
            if not all(o["within_budget"] and o["p100_not_better"] for o in out):
                bad.append(f"{r['name']} {method}: over budget or beaten by the discretised DP")
    return bad


def report(results, command, repeats, ref_repeats) -> str:
    lines = [
        "## Solver",
        "",
        "`layermerge solve` is exact by default: a dynamic program over Pareto frontiers "
        "of (latency, score) over the tables' real-valued latencies (`layermerge.solve`). "
        "It is timed here against the discretised DP of earlier versions (latencies rounded "
        "up to 1/P ms, still available with `--precision P`) at P = 100 (the former default) "
        "and 1000, and against the same discretised recurrence written as per-state Python "
        "loops over dictionaries (`layermerge.solve._reference_dp`). Times are medians in "
        f"one process ({repeats} runs; the dictionary DP {ref_repeats}); budgets are "
        "fractions of the unmodified network's latency (2.0: above the slowest plan, "
        "the whole curve). Each exact solve also yields the trade-off curve up to its "
        "budget.",
        "",
        f"Reproduce: `{command}`  ",
        f"Machine: {machine()}",
        "",
        "| table | budget | exact | exact from tables | P=100 | P=1000 | objective (exact) "
        "| shortfall at P=100 | shortfall at P=1000 | curve breakpoints |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for row in r["rows"]:
            lines.append(
                f"| {r['name']} | {row['frac']:g} | {_ms(row['exact_ms'])} "
                f"| {_ms(row['exact_from_tables_ms'])} | {_ms(row['p100_ms'])} "
                f"| {_ms(row['p1000_ms'])} | {row['objective']:.4f} | {_gap(row, 100)} "
                f"| {_gap(row, 1000)} | {row['breakpoints']} |"
            )
    lines += [
        "",
        "Shortfall: exact objective minus the discretised plan's (exp score: about one "
        "per block, so 1.0 is a whole block's worth); 'infeasible' when rounding every "
        "latency up leaves no plan within the budget. Every exact plan is within its "
        "budget as reported (latency summed in plan order plus the constant part).",
        "",
        "| table | search space | discretised whole curve at P=100 (units): numpy "
        "| dictionary loops | identical | optimum at 0.7 bracketed at P=10 000 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        br = r["bracket"]
        lines.append(
            f"| {r['name']} | {r['blocks']} blocks / {r['options']} options, L={r['L']} "
            f"({r['source']}) | {_ms(r['dp100_ms'])} ({r['ref_units']}) | {_ms(r['ref_ms'])} "
            f"| {'yes' if r['ref_identical'] else 'NO'} "
            f"| {br['lower']:.4f} <= {next(x for x in r['rows'] if x['frac'] == br['frac'])['objective']:.4f}"
            f" <= {br['upper']:.4f} {'(yes)' if br['ok'] else '(NO)'} |"
        )
    lines += [
        "",
        "Baselines, exact (objective; shortfall of the discretised P=100 plan):",
        "",
        "| table | method | " + " | ".join(f"budget {f:g}" for f in FRACS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in FRACS) + " |",
    ]
    for r in results:
        for method, out in r["baselines"].items():
            cells = []
            for o in out:
                if o["objective"] is None:
                    cells.append("infeasible")
                    continue
                old = o["p100_objective"]
                gap = "infeasible at P=100" if old is None else f"{o['objective'] - old:.4f}"
                cells.append(f"{_ms(o['exact_ms'])}; {o['objective']:.3f}; {gap}")
            lines.append(f"| {r['name']} | {method} | " + " | ".join(cells) + " |")
    sources = {r["source"] for r in results}
    lines += [
        "",
        "Latencies and importances are synthetic (seeded) in every row. "
        + (
            "The search spaces are the real ones from `layermerge inspect`."
            if sources == {"real"}
            else "Rows marked synthetic use a generated chain "
            "with the same block and option counts."
        )
        + " The exact solver's cost grows with the number of non-dominated partial "
        "plans (a few thousand over all nodes here), not with a latency grid.",
        "",
    ]
    return "\n".join(lines)


def write_docs(section: str) -> Path:
    from _docs import write_section

    return write_section("## Solver", section)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--ref-repeats", type=int, default=3)
    ap.add_argument("--synthetic", action="store_true", help="do not try the real search spaces")
    ap.add_argument(
        "--write-docs",
        action="store_true",
        help=f"replace the '## Solver' section of docs/benchmarks.md and write {JSON_OUT.name}",
    )
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed, (name, (n_blocks, n_options, chain_ms, constant_ms)) in enumerate(MODELS.items()):
            options = None if args.synthetic else real_options(name, work)
            source = "real" if options is not None else "synthetic"
            if options is None:
                options = synthetic_options(n_blocks, n_options, seed)
            lat, imp = synthetic_values(options, chain_ms, constant_ms, seed, work, name)
            r = bench(name, lat, imp, source, args.repeats, args.ref_repeats)
            results.append(r)
            worst = max(row["exact_ms"] for row in r["rows"])
            print(
                f"{name}: {r['blocks']} blocks / {r['options']} options ({source} space): "
                f"exact solve at most {_ms(worst)} over budgets {', '.join(map(str, FRACS))}; "
                f"dictionary DP {_ms(r['ref_ms'])}"
            )
    command = ".venv/bin/python benchmarks/bench_solve.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    section = report(results, command.strip(), args.repeats, args.ref_repeats)
    print()
    print(section)
    data = {"command": command.strip(), "machine": machine(), "results": results}
    for path in [args.json] + ([JSON_OUT] if args.write_docs else []):
        if path:
            Path(path).write_text(json.dumps(data, indent=2) + "\n")
            print(f"wrote {path}")
    if args.write_docs:
        print(f"wrote {write_docs(section)}")
    bad = ok(results)
    for b in bad:
        print(f"FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
