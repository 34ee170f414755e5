"""``layermerge solve``: tables + budget -> plan (and the trade-off curve).

The work is done by :func:`layermerge.solve.solve_tables`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..plan import DROP_METHODS, PlanError
from ..solve import (
    METHODS,
    SCORE_MODES,
    InfeasibleBudgetError,
    Solution,
    solve_tables,
)
from ..tables import Table, TableError, concat_tables, read_table
from .common import UsageError, positive_int


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "solve",
        help="choose a plan from latency and importance tables under a latency budget",
        description=(
            "Solve the LayerMerge dynamic program (or a baseline) over the tables and write "
            "the best plan within the budget. One solve gives the whole score/latency "
            "trade-off curve up to the budget (--frontier, --plot)."
        ),
    )
    p.add_argument(
        "--latency",
        required=True,
        nargs="+",
        metavar="T.csv",
        help="latency table (several files: shards of one table)",
    )
    p.add_argument(
        "--importance",
        nargs="+",
        metavar="I.csv",
        help="importance table (needed by layermerge, kim23 and layermerge-drop)",
    )
    p.add_argument(
        "--conv-importance",
        nargs="+",
        metavar="C.csv",
        help="per-conv importance table (needed by layerprune and layermerge-drop)",
    )
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget-ms",
        type=float,
        metavar="MS",
        help="latency budget in ms, the part outside the chain included",
    )
    budget.add_argument(
        "--budget-frac",
        type=float,
        metavar="F",
        help="budget as a fraction of the unmodified network's latency",
    )
    budget.add_argument(
        "--speedup", type=float, metavar="S", help="budget = unmodified network's latency / S"
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="layermerge",
        help="layermerge (merge + prune, default), kim23 (activations only), "
        "layerprune (convs only), layermerge-drop (layermerge plus layerprune's conv drops)",
    )
    p.add_argument(
        "--score",
        choices=SCORE_MODES,
        default="exp",
        help="exp: the paper's normalised importance (default); additive: raw "
        "delta_acc (or -val_loss_ratio)",
    )
    p.add_argument(
        "--precision",
        type=float,
        default=None,
        metavar="P",
        help="solve on a grid of 1/P ms with latencies rounded up: never over budget, but "
        "it loses objective (about one block's worth on MobileNetV2 at P=100) and may call "
        "a tight budget infeasible; default: the exact solver",
    )
    p.add_argument("--out", required=True, metavar="plan.json", help="where to write the plan")
    p.add_argument(
        "--frontier",
        metavar="curve.csv",
        help="write the trade-off curve (budget_ms, objective, latency_ms)",
    )
    p.add_argument("--plot", metavar="curve.png", help="plot the trade-off curve (matplotlib)")
    p.add_argument(
        "--top",
        type=int,
        metavar="K",
        help="also write the K best Pareto-optimal plans within the budget (each optimal "
        "at its own latency; the first is the plan of --out) as OUT_top1.json, ...",
    )
    p.add_argument(
        "--measure",
        metavar="MODEL",
        help="also time the plan's merged network (and --top's) against the unmodified "
        "network on the latency table's backend and settings, and print each "
        "measurement beside its prediction; MODEL as given to `layermerge latency` "
        "(the input shape is the table's)",
    )
    p.add_argument(
        "--measure-kwargs",
        metavar="JSON",
        help="--measure: JSON object passed to the model's constructor (as --model-kwargs "
        "of `layermerge latency`)",
    )
    p.add_argument(
        "--measure-rounds",
        type=positive_int,
        default=10,
        metavar="N",
        help="interleaved rounds of --measure (default 10, 5 calls per network each)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
    return p


def _read(paths: list[str] | None, kind: str) -> Table | None:
    if not paths:
        return None
    return concat_tables([read_table(p, kind) for p in paths])


def plot_frontier(solution: Solution, path: str | Path) -> Path:
    """PNG of the best score against the latency budget, the chosen plan marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = solution.frontier.steps()
    p = solution.problem
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    # The curve is flat after its last step, up to the budget solved for.
    x = [*st.budget_ms.tolist(), solution.budget_ms]
    y = [*st.objective.tolist(), solution.objective]
    ax.step(x, y, where="post", label="best objective within budget")
    ax.plot(
        [solution.predicted_latency_ms],
        [solution.objective],
        "o",
        color="C3",
        label=f"chosen plan ({solution.predicted_latency_ms:.2f} ms)",
    )
    ax.axvline(solution.budget_ms, color="C3", ls=":", lw=1, label="budget")
    ax.axvline(p.base_latency_ms, color="0.5", ls="--", lw=1, label="unmodified network")
    ax.set_xlabel("latency budget (ms)")
    ax.set_ylabel(f"objective ({p.score_mode} score)")
    ax.set_title(f"{p.method}: objective vs latency")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def measure(spec: str, latency: Table, plans: dict, rounds: int, kwargs: str | None) -> dict:
    """--measure: {label: PlanTiming} for the plans and the unmodified network."""
    from ..latency import BackendError, measure_plans
    from ..models import load_model
    from ..trace import trace
    from .common import UserError

    shape = tuple(int(v) for v in latency.meta.get("input_shape") or ()) or None
    try:
        loaded = load_model(spec, kwargs, input_shape=shape)
        traced = trace(loaded.model, shape or loaded.input_shape)
        return measure_plans(traced, plans, latency, rounds=rounds)
    except (BackendError, TableError, ValueError) as e:
        raise UserError(f"--measure: {e}") from None


def run(args: argparse.Namespace) -> int:
    if args.method in DROP_METHODS and not args.conv_importance:
        raise UsageError(
            f"--method {args.method} needs --conv-importance C.csv (the per-conv table that "
            "`layermerge importance` writes beside the importance table)"
        )
    if args.method != "layerprune" and not args.importance:
        raise UsageError(f"--method {args.method} needs --importance I.csv")
    try:
        latency = concat_tables([read_table(p, "latency") for p in args.latency])
        solution = solve_tables(
            latency,
            _read(args.importance, "importance"),
            method=args.method,
            conv_importance=_read(args.conv_importance, "conv_importance"),
            budget_ms=args.budget_ms,
            budget_frac=args.budget_frac,
            speedup=args.speedup,
            score=args.score,
            precision=args.precision,
        )
        plan = solution.plan
        plan.meta["tables"] = {
            "latency": args.latency,
            "importance": args.importance or [],
            "conv_importance": args.conv_importance or [],
        }
        out = plan.save(args.out)
        top = []
        if args.top is not None:
            for i, p in enumerate(solution.top_plans(args.top), 1):
                p.meta["tables"] = plan.meta["tables"]
                path = p.save(Path(args.out).with_name(f"{Path(args.out).stem}_top{i}.json"))
                top.append((path, p))
        frontier = solution.frontier.write_csv(args.frontier) if args.frontier else None
        timed = None
        if args.measure:
            todo = {"plan": plan} | {f"top {i}": p for i, (_, p) in enumerate(top, 1) if i > 1}
            timed = measure(args.measure, latency, todo, args.measure_rounds, args.measure_kwargs)
        plot = plot_frontier(solution, args.plot) if args.plot else None
    except (TableError, PlanError, InfeasibleBudgetError):
        raise  # reported by layermerge.cli.main
    except ValueError as e:  # a value of the command line the solver cannot use
        raise UsageError(str(e)) from e
    base = solution.problem.base_latency_ms
    if args.json:
        print(
            json.dumps(
                {
                    "method": plan.method,
                    "score": solution.problem.score_mode,
                    "objective": solution.objective,
                    "predicted_latency_ms": solution.predicted_latency_ms,
                    "budget_ms": solution.budget_ms,
                    "base_latency_ms": base,
                    "predicted_speedup": plan.meta["predicted_speedup"],
                    "blocks": len(plan.blocks),
                    "kept_convs": len(plan.kept_convs),
                    "kept_activations": len(plan.kept_activations),
                    "plan": str(out),
                    "frontier": str(frontier) if frontier else None,
                    "plot": str(plot) if plot else None,
                    "measured": {k: v.to_dict() for k, v in timed.items()} if timed else None,
                    "top": [
                        {
                            "plan": str(path),
                            "objective": p.meta["objective"],
                            "predicted_latency_ms": p.meta["predicted_latency_ms"],
                        }
                        for path, p in top
                    ],
                }
            )
        )
    else:
        speed = plan.meta["predicted_speedup"]
        print(f"{plan.method} plan: {plan.summary()}")
        print(
            f"  budget {solution.budget_ms:.3f} ms, predicted latency "
            f"{solution.predicted_latency_ms:.3f} ms (unmodified {base:.3f} ms"
            + (f", {speed:.2f}x" if speed else "")
            + f"), objective {solution.objective:.6g} ({solution.problem.score_mode} score)"
        )
        print(f"  wrote {out}" + "".join(f", {p}" for p in (frontier, plot) if p))
        for i, (path, p) in enumerate(top, 1):
            print(
                f"  top {i}: objective {p.meta['objective']:.6g}, predicted latency "
                f"{p.meta['predicted_latency_ms']:.3f} ms: {path}"
            )
        if timed:
            _print_timed(timed, latency)
    return 0


def _print_timed(timed: dict, latency: Table) -> None:
    base = timed["unmodified"]
    m = latency.meta
    print(
        f"  measured on {m.get('backend')} ({m.get('device')}, {m.get('threads')} thread(s), "
        f"batch {m.get('batch_size')}; {m.get('statistic')} of {base.measurement.runs} calls "
        "each, interleaved):"
    )
    for label, t in timed.items():
        speed = base.measured_ms / t.measured_ms
        pred_speed = base.predicted_ms / t.predicted_ms
        print(
            f"    {label:10s} measured {t.measured_ms:.3f} ms, predicted {t.predicted_ms:.3f} ms "
            f"({100 * t.error:+.1f} %)"
            + (f"; speed-up {speed:.2f}x, predicted {pred_speed:.2f}x" if t is not base else "")
        )
