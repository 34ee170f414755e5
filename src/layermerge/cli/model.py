"""``layermerge inspect | verify | export``: a model's chain and search space, the
exactness of merging, and the deploy network of a plan written to disk."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..export import FORMATS, ExportError, export
from ..space import build_space
from ..trace import conv_weights
from ..transform import randomize_batchnorm, verify
from .common import (
    UserError,
    add_model_args,
    deploy,
    load,
    load_traced,
    nonnegative_int,
    print_json,
    trace_loaded,
    write_text_atomic,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_inspect(subparsers)
    _register_verify(subparsers)
    _register_export(subparsers)


# ----------------------------------------------------------------------------- inspect


def _register_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show the chain and the search space of a model",
        description="Trace MODEL into LayerMerge's chain and print it with its search space.",
    )
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--options-csv", metavar="FILE", help="write the search space as a table")
    p.add_argument("--chain-json", metavar="FILE", help="write the full chain description")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    loaded, traced = load_traced(args)
    chain = traced.chain
    space = build_space(chain, conv_weights(traced))
    if args.options_csv:
        seed = {} if loaded.init_seed is None else {"init_seed": loaded.init_seed}
        space.write_options_csv(args.options_csv, **seed)
    if args.chain_json:
        write_text_atomic(args.chain_json, json.dumps(chain.to_dict(), indent=2) + "\n")
    summary = {
        "model": args.model,
        "input_shape": list(loaded.input_shape),
        "model_fingerprint": chain.fingerprint(),
        **space.summary(),
        "skips": len(chain.skips),
        "convs_outside_chain": chain.frozen_outside,
        "activation": chain.activation,
    }
    if args.json:
        print_json(summary)
        return 0
    print(format_chain(chain))
    print()
    print(
        f"{args.model} {tuple(loaded.input_shape)}: chain length {chain.length}, "
        f"{len(chain.skips)} skips, {len(chain.breaks)} breaks, "
        f"{summary['blocks']} valid blocks, {summary['options']} options "
        f"(fingerprint {summary['model_fingerprint']})"
    )
    if chain.frozen_outside:
        print(f"kept outside the chain: {', '.join(chain.frozen_outside)}")
    if args.options_csv:
        print(f"search space written to {args.options_csv}")
    return 0


def format_chain(chain) -> str:
    """A readable table of the chain: one row per conv, with skip and break marks."""
    starts: dict[int, list[str]] = {}
    ends: dict[int, list[str]] = {}
    for s in chain.skips:
        tag = f"{s.start}->{s.end}" + (" proj" if s.projection else "")
        starts.setdefault(s.start, []).append(tag)
        ends.setdefault(s.end, []).append(tag)
    rows = [("node", "conv", "k", "s", "channels", "groups", "act", "out shape", "skip", "break")]
    n0 = chain.nodes[0]
    rows.append(
        (
            "0",
            "(input)",
            "",
            "",
            "",
            "",
            "",
            "x".join(map(str, n0.shape)),
            "from " + ",".join(starts.get(0, [])) if 0 in starts else "",
            "",
        )
    )
    for c in chain.convs:
        n = chain.nodes[c.index]
        marks = []
        if c.index in ends:
            marks.append("+ " + ",".join(ends[c.index]))
        if c.index in starts:
            marks.append("from " + ",".join(starts[c.index]))
        groups = "dw" if c.depthwise else (str(c.groups) if c.groups > 1 else "")
        rows.append(
            (
                str(c.index),
                c.path + (" *" if c.irreducible else ""),
                str(c.kernel),
                str(c.stride),
                f"{c.in_channels}->{c.out_channels}",
                groups,
                n.activation or "-",
                "x".join(map(str, n.shape)),
                " ".join(marks),
                (n.break_reason or "break") if n.is_break else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("(* irreducible: channels change, stride > 1, grouped or frozen)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ verify


def _register_verify(sub) -> None:
    p = sub.add_parser(
        "verify",
        help="check that merged networks equal their train-time networks",
        description=(
            "Apply N uniformly random plans plus the two extreme plans (nothing compressed; "
            "every block as long as allowed), merge each, and compare outputs."
        ),
    )
    add_model_args(p)
    p.add_argument(
        "--plans", type=nonnegative_int, default=20, help="number of random plans (default 20)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    loaded = load(args)
    loaded.model.to(getattr(torch, args.dtype))
    if args.weights is None:
        randomize_batchnorm(loaded.model, args.seed)
    traced = trace_loaded(args, loaded)

    space = build_space(traced.chain, conv_weights(traced))
    rng = random.Random(args.seed)
    plans = [space.identity_plan(), space.deepest_plan()]
    plans += [space.random_plan(rng) for _ in range(args.plans)]
    t0 = time.time()
    progress = None
    if not args.json and sys.stderr.isatty():

        def progress(done, total):
            print(f"\rverified {done}/{total} plans", end="", file=sys.stderr, flush=True)

    result = verify(traced, plans, seed=args.seed, progress=progress)
    result["seconds"] = round(time.time() - t0, 2)
    result["dtype"] = args.dtype
    if progress:
        print(file=sys.stderr)
    if args.json:
        print_json(result)
    else:
        status = "OK" if not result["failures"] else f"{len(result['failures'])} FAILED"
        print(
            f"{args.model}: {result['plans']} plans in {args.dtype}, max relative error "
            f"{result['max_rel_err']:.2e} (tolerance {result['tolerance']:.0e}), "
            f"max abs error {result['max_abs_err']:.2e}: {status}"
        )
        for f in result["failures"]:
            print(f"  plan {f['plan']}: {f['error']}")
    return 0 if not result["failures"] else 1


# ------------------------------------------------------------------------------ export


def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the merged network of a plan (ONNX, torch.export, TorchScript)",
        description=(
            "Merge MODEL under PLAN (the train-time weights from finetune if given), export "
            "it, and check every export against PyTorch."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", help="plan.json (default: nothing compressed, BN folded)")
    p.add_argument("--train-weights", help="train-time network state dict saved by finetune")
    p.add_argument(
        "--format",
        action="append",
        choices=["onnx", "pt2", "torchscript"],
        help="repeatable; default: onnx and pt2",
    )
    p.add_argument("--out-dir", required=True, help="directory for model.onnx, model.pt2, ...")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_export)


#: the formats written when --format is not given
FMTS = ["onnx", "pt2"]


def cmd_export(args) -> int:
    loaded, traced = load_traced(args)
    plan = args.plan or build_space(traced.chain).identity_plan()
    # with all the model's inputs: a UNet's sample and timestep
    net = traced.family.export_module(deploy(traced, plan, args.train_weights))
    results = []
    for fmt in args.format or FMTS:
        path = Path(args.out_dir) / f"model{FORMATS[fmt]}"
        existed = path.exists()
        try:
            results.append(export(net, fmt, path, loaded.input_shape))
        except BaseException as e:
            # a failed export (full or read-only disk) leaves no empty or partial file
            if not existed and path.is_file():
                path.unlink()
            if isinstance(e, ExportError):
                raise UserError(str(e)) from e
            raise
    if args.json:
        print_json({"exports": results, "input_shape": list(loaded.input_shape)})
    else:
        for r in results:
            print(
                f"{r['format']:12s} {r['path']}  (max relative error vs PyTorch "
                f"{r['max_rel_err']:.1e})"
            )
    return 0
