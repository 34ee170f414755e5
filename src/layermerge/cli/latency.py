"""``layermerge latency`` and ``layermerge benchmark``: the latency layer on the command line.

The work is done by :func:`layermerge.latency.build_latency_table` and
:func:`layermerge.latency.benchmark`.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..families import family_of
from ..latency import (
    BACKENDS,
    DTYPES,
    EXPORTERS,
    BackendError,
    BackendSettings,
    TimingConfig,
    benchmark,
    build_latency_table,
    make_backend,
    read_latency_tables,
)
from ..plan import Plan
from ..sampling import benchmark_sampling
from ..tables import TableError
from .common import (
    UsageError,
    UserError,
    add_model_args,
    default_device,
    deprecated_alias,
    device_arg,
    load_traced,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    print_json,
)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend (recorded with every measurement)")
    g.add_argument("--backend", choices=BACKENDS, default="torch", help="default: torch")
    g.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu or cuda[:N] (default: cuda if available, else cpu)",
    )
    g.add_argument("--threads", type=positive_int, default=1, help="intra-op threads (default 1)")
    g.add_argument("--batch-size", type=positive_int, default=1, metavar="B", help="default 1")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument(
        "--providers",
        default=None,
        metavar="P1,P2",
        help="onnxruntime execution providers in priority order, e.g. "
        "TensorrtExecutionProvider,CUDAExecutionProvider (default: CPU, or CUDA with "
        "--device cuda)",
    )
    g.add_argument("--compile", action="store_true", help="torch: run through torch.compile")
    g.add_argument(
        "--clock",
        choices=["auto", "cpu", "wall"],
        default="auto",
        help="what a call's time is: the process's CPU time (auto with one thread on the "
        "CPU: the time other processes hold the core is left out) or the wall clock "
        "(auto otherwise)",
    )
    g.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="onnxruntime: how models are exported to ONNX (auto: the fast TorchScript "
        "exporter while torch has it, else dynamo)",
    )


def _backend(args):
    providers = tuple(p for p in args.providers.split(",") if p) if args.providers else None
    try:
        return make_backend(
            BackendSettings(
                backend=args.backend,
                device=default_device(args.device),
                threads=args.threads,
                batch_size=args.batch_size,
                dtype=args.dtype,
                providers=providers,
                compile=args.compile,
                exporter=args.exporter,
                clock=args.clock,
            )
        )
    except BackendError as e:
        if str(e).startswith(("--device", "unsupported device")):
            raise UsageError(str(e), hint="use --device cpu") from None  # not usable here
        raise UserError(str(e)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "latency",
        help="measure the latency table of a model's search space",
        description=(
            "Time the merged conv (+ activation) of every option at its real input shape "
            "and the constant rest of the network; write the table and its sidecar. "
            "An interrupted run resumes: rerun the same command."
        ),
    )
    add_model_args(p)
    _add_backend_args(p)
    p.add_argument("--out", required=True, metavar="T.csv", help="latency table to write")
    t = p.add_argument_group("timing")
    t.add_argument(
        "--protocol",
        choices=["adaptive", "reference"],
        default="adaptive",
        help="adaptive (default): stop when the --statistic is stable; reference: 300 warm-up "
        "+ 200 timed calls per entry, as the reference implementation",
    )
    d = TimingConfig()
    t.add_argument(
        "--rel-tol",
        type=nonnegative_float,
        default=d.rel_tol,
        help=f"stop when the 95%% CI of the median is within this fraction (default {d.rel_tol})",
    )
    t.add_argument(
        "--max-time",
        type=positive_float,
        default=d.max_time_s,
        metavar="S",
        help=f"cap on the timed calls of one entry in seconds (default {d.max_time_s})",
    )
    t.add_argument(
        "--min-runs", type=positive_int, default=d.min_runs, help=f"default {d.min_runs}"
    )
    t.add_argument(
        "--statistic",
        choices=["min", "median"],
        default=d.statistic,
        help="summary of an entry's calls (default min: on a shared machine the median "
        "follows the load of other processes; see docs/benchmarks.md)",
    )
    t.add_argument(
        "--warmup-time",
        type=nonnegative_float,
        default=d.warmup_s,
        metavar="S",
        help=f"warm-up per entry in seconds (default {d.warmup_s})",
    )
    p.add_argument("--no-constant", action="store_true", help="skip measuring constant_ms")
    p.add_argument(
        "--max-entries",
        type=nonnegative_int,
        default=None,
        help="stop after this many new entries",
    )
    prog = p.add_mutually_exclusive_group()
    prog.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="progress bar with ETA on stderr (default: when stderr is a terminal)",
    )
    prog.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_latency)

    b = subparsers.add_parser(
        "benchmark",
        help="time the original (BN folded) and a plan's merged network",
        description=(
            "Time the original network with BatchNorm folded and, with --plan, the merged "
            "network of the plan, interleaved and repeated; print both, the speed-up, and "
            "the predicted latency when a latency table is given."
        ),
    )
    add_model_args(b)
    _add_backend_args(b)
    b.add_argument("--plan", metavar="plan.json", help="the plan to time (default: none)")
    b.add_argument(
        "--latency",
        nargs="+",
        metavar="T.csv",
        help="latency table (or shards) measured with the same settings: adds predictions",
    )
    b.add_argument(
        "--rounds", type=positive_int, default=10, help="interleaved rounds (default 10)"
    )
    b.add_argument(
        "--calls-per-round",
        dest="calls",
        type=positive_int,
        default=5,
        help="calls per network and round (default 5)",
    )
    deprecated_alias(b, "--calls", "--calls-per-round", dest="calls", type=positive_int)
    b.add_argument(
        "--max-time",
        type=positive_float,
        default=60.0,
        metavar="S",
        help="cap on the rounds (default 60)",
    )
    b.add_argument(
        "--sampling-steps",
        type=positive_int,
        metavar="N",
        help="diffusion models: time whole DDIM sampling runs of N steps (one run per network "
        "and round) instead of single forwards",
    )
    b.add_argument(
        "--eta", type=nonnegative_float, default=0.0, help="DDIM eta of --sampling-steps"
    )
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_benchmark)


def cmd_latency(args) -> int:
    if args.protocol == "reference":
        timing = TimingConfig.reference(statistic=args.statistic)
    else:
        timing = TimingConfig(
            rel_tol=args.rel_tol,
            max_time_s=args.max_time,
            min_runs=args.min_runs,
            warmup_s=args.warmup_time,
            statistic=args.statistic,
        )
    loaded, traced = load_traced(args)
    backend = _backend(args)
    t0 = time.perf_counter()
    try:
        table = build_latency_table(
            traced,
            args.out,
            backend,
            timing=timing,
            model=args.model,
            constant=not args.no_constant,
            progress=args.progress,
            max_entries=args.max_entries,
        )
    except (TableError, BackendError) as e:
        raise UserError(str(e)) from None
    runs = {r["run"] for r in table.rows}
    summary = {
        "table": args.out,
        "entries": len(table),
        "complete": bool(table.meta.get("complete")),
        "constant_ms": table.meta.get("constant_ms"),
        "identity_ms": table.meta.get("identity_ms"),
        "backend": table.meta["backend"],
        "threads": table.meta["threads"],
        "batch_size": table.meta["batch_size"],
        "runs": len(runs),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if args.json:
        print_json(summary)
        return 0
    state = "complete" if summary["complete"] else "incomplete (rerun to resume)"
    print(
        f"{args.model}: {len(table)} entries, {state}, {summary['backend']} "
        f"{summary['threads']} thread(s), batch {summary['batch_size']}, "
        f"{summary['seconds']:.1f} s"
    )
    if summary["constant_ms"] is not None:
        print(
            f"  constant_ms {summary['constant_ms']:.4f} (original network, BN folded: "
            f"{summary['identity_ms']:.4f} ms)"
        )
    print(f"  wrote {args.out}")
    return 0


def cmd_benchmark(args) -> int:
    loaded, traced = load_traced(args)
    plan = Plan.load(args.plan) if args.plan else None
    backend = _backend(args)
    try:
        table = read_latency_tables(args.latency) if args.latency else None
        if table is not None and "constant_ms" not in table.meta:
            print(
                "layermerge benchmark: warning: the latency table has no constant_ms, so "
                "predictions leave out everything outside the chain",
                file=sys.stderr,
            )
        if args.sampling_steps is not None:
            if not family_of(traced).takes_timestep:
                raise UsageError(
                    "--sampling-steps needs a denoiser called as model(x, t), such as a "
                    f"diffusers UNet (diffusers:...); {args.model} is a "
                    f"{family_of(traced).name} model"
                )
            result = benchmark_sampling(
                traced,
                plan,
                backend,
                steps=args.sampling_steps,
                eta=args.eta,
                rounds=args.rounds,
                max_time_s=args.max_time,
            )
        else:
            result = benchmark(
                traced,
                plan,
                backend,
                table=table,
                rounds=args.rounds,
                calls_per_round=args.calls,
                max_time_s=args.max_time,
            )
    except (TableError, BackendError) as e:
        raise UserError(str(e)) from None
    out = {
        "model": args.model,
        "plan": args.plan,
        "baseline_ms": result.baseline_ms,
        "compressed_ms": result.compressed_ms,
        "speedup": result.speedup,
        "predicted_ms": result.predicted_ms,
        "predicted_baseline_ms": result.predicted_baseline_ms,
        "runs": result.baseline.runs,
        "sampling_steps": args.sampling_steps,
        "settings": result.settings,
    }
    if args.json:
        print_json(out)
        return 0
    s = result.settings
    print(
        f"{args.model} on {s['backend']} ({s['device']}, {s['threads']} thread(s), "
        f"batch {s['batch_size']}, {s['dtype']}), {result.baseline.runs} calls each"
    )
    if args.sampling_steps is not None:
        print(f"whole DDIM sampling runs of {args.sampling_steps} steps (eta {args.eta})")
    print(f"baseline_ms    {result.baseline_ms:.4f}   (original network, BatchNorm folded)")
    if result.compressed_ms is not None:
        print(f"compressed_ms  {result.compressed_ms:.4f}")
        print(f"speedup        {result.speedup:.3f}")
    if result.predicted_ms is not None:
        print(f"predicted_ms   {result.predicted_ms:.4f}   (latency table)")
    if result.predicted_baseline_ms is not None:
        print(f"predicted_baseline_ms {result.predicted_baseline_ms:.4f}")
    return 0
