"""``layermerge`` command line: a thin layer over the library.

Every command that takes a MODEL accepts ``--model-kwargs``, ``--weights``,
``--input-shape``, ``--include-stem``, ``--include-head`` and ``--freeze``.
Errors the user can fix print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


class UserError(Exception):
    """Something on the command line is wrong; the message says what to do."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision:NAME, timm:NAME, layermerge:NAME or path/to/file.py:factory",
    )
    p.add_argument("--model-kwargs", default=None, help="JSON object passed to the constructor")
    p.add_argument("--weights", default=None, help="state dict (.pt/.pth) or .safetensors file")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default per family)")
    p.add_argument("--include-stem", action="store_true", help="bring the stem conv into the chain")
    p.add_argument("--include-head", action="store_true", help="bring the 1x1 head conv in")
    p.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="MODULE",
        help="module path of a conv to keep (irreducible); repeatable",
    )


def load_traced(args):
    """MODEL and its flags -> (loaded model, traced model)."""
    from .models import load_model
    from .trace import trace

    loaded = load_model(args.model, args.model_kwargs, args.weights, args.input_shape)
    traced = trace(
        loaded.model,
        loaded.input_shape,
        include_stem=args.include_stem,
        include_head=args.include_head,
        freeze=args.freeze,
    )
    return loaded, traced


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
    from .space import build_space
    from .trace import conv_weights

    loaded, traced = load_traced(args)
    chain = traced.chain
    space = build_space(chain, conv_weights(traced))
    if args.options_csv:
        space.write_options_csv(args.options_csv)
    if args.chain_json:
        from pathlib import Path

        Path(args.chain_json).write_text(json.dumps(chain.to_dict(), indent=2) + "\n")
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
        print(json.dumps(summary))
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
    p.add_argument("--plans", type=int, default=20, help="number of random plans (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_verify)


def cmd_verify(args) -> int:
    import torch

    from .models import load_model
    from .space import build_space
    from .trace import conv_weights, trace
    from .transform import randomize_batchnorm, verify

    loaded = load_model(args.model, args.model_kwargs, args.weights, args.input_shape)
    model = loaded.model.to(getattr(torch, args.dtype))
    if args.weights is None:
        randomize_batchnorm(model, args.seed)
    traced = trace(
        model,
        loaded.input_shape,
        include_stem=args.include_stem,
        include_head=args.include_head,
        freeze=args.freeze,
    )

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
        print(json.dumps(result))
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


def cmd_export(args) -> int:
    from pathlib import Path

    from .export import FORMATS, ExportError, export, load_compressed
    from .space import build_space

    loaded, traced = load_traced(args)
    plan = args.plan or build_space(traced.chain).identity_plan()
    deploy = load_compressed(traced, plan, args.train_weights)
    results = []
    for fmt in args.format or ["onnx", "pt2"]:
        path = Path(args.out_dir) / f"model{FORMATS[fmt]}"
        try:
            results.append(export(deploy, fmt, path, loaded.input_shape))
        except ExportError as e:
            raise UserError(str(e)) from e
    if args.json:
        print(json.dumps({"exports": results, "input_shape": list(loaded.input_shape)}))
    else:
        for r in results:
            print(
                f"{r['format']:12s} {r['path']}  (max relative error vs PyTorch "
                f"{r['max_rel_err']:.1e})"
            )
    return 0


# ---------------------------------------------------------------------- compress / demo


def _register_compress(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="run the whole pipeline from a YAML config, caching every stage",
        description=(
            "trace -> latency tables -> importance tables -> solve (every method and budget) "
            "-> fine-tune -> merge and verify -> export -> benchmark -> report, in a run "
            "directory where finished stages are reused."
        ),
    )
    p.add_argument(
        "config",
        metavar="CONFIG.yaml",
        help="a config file, or the name of a packaged recipe: resnet34-imagenet, "
        "mobilenetv2-1.0-imagenet, mobilenetv2-1.4-imagenet (see docs/recipes.md)",
    )
    p.add_argument("--run-dir", help="default: runs/<config name>[-smoke]")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="apply the config's smoke: section (tiny input, one or two steps, CPU, a few "
        "timed calls) to check every stage in a few minutes; the report says so",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data=imagefolder:/data/imagenet "
        "--set finetune.epochs=30 --set solve.budgets=[0.6] (values are YAML; repeatable; "
        "applied after --smoke)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the config after --smoke and --set, and exit",
    )
    p.set_defaults(func=cmd_compress)
    d = sub.add_parser(
        "demo",
        help="the embedded demo: Fashion-MNIST, a small ResNet, all three methods",
        description="Run `compress` on the built-in demo config (see --print-config).",
    )
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--print-config", action="store_true", help="print the demo config and exit")
    d.set_defaults(func=cmd_demo)


def _run_compress(cfg, run_dir) -> int:
    import gc

    from .compress import ConfigError, compress
    from .distributed import from_env, shutdown

    try:
        result = compress(cfg, run_dir, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        raise UserError(str(e)) from e
    finally:
        # Free what still refers to the process group (DistributedDataParallel wrappers
        # kept alive by the reference cycles of fx modules) while it and the interpreter
        # are alive: freed at exit instead, gloo aborts the process now and then.
        gc.collect()
        shutdown()  # the process group torchrun made compress join, if any
    if from_env().is_main:
        print(f"report written to {result.report}")
    return 0


def cmd_compress(args) -> int:
    from pathlib import Path

    from .compress import ConfigError, load_config, read_config_data
    from .compress_diffusion import is_diffusion_config

    name = Path(args.config).name.removesuffix(".yaml").removesuffix(".yml")
    run_dir = args.run_dir or Path("runs") / (name + ("-smoke" * args.smoke))
    if is_diffusion_config(args.config):  # a diffusion UNet: its own stages
        return _compress_diffusion(args, run_dir)
    try:
        if args.print_config:
            import yaml

            path, data = read_config_data(args.config, smoke=args.smoke, overrides=args.overrides)
            data.pop("is_smoke", None)
            how = " with --smoke" * args.smoke + "".join(f" --set {o}" for o in args.overrides)
            print(f"# {path}{how}")
            print(yaml.safe_dump(data, sort_keys=False), end="")
            return 0
        cfg = load_config(args.config, smoke=args.smoke, overrides=args.overrides)
    except ConfigError as e:
        raise UserError(str(e)) from e
    return _run_compress(cfg, run_dir)


def _compress_diffusion(args, run_dir) -> int:
    from .compress import ConfigError
    from .compress_diffusion import DiffusionConfigError, compress_diffusion, load_diffusion_config

    try:
        cfg = load_diffusion_config(args.config, smoke=args.smoke, overrides=args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        compress_diffusion(cfg, run_dir)
    except (DiffusionConfigError, ConfigError) as e:
        raise UserError(str(e)) from e
    return 0


def demo_config_path():
    from pathlib import Path

    return Path(__file__).parent / "configs" / "demo.yaml"


def cmd_demo(args) -> int:
    from .compress import load_config

    path = demo_config_path()
    if args.print_config:
        print(path.read_text(), end="")
        return 0
    return _run_compress(load_config(path), args.run_dir)


COMMANDS += [_register_inspect, _register_verify, _register_export, _register_compress]


#: modules that add their own commands with ``register(subparsers)``
OPTIONAL_COMMANDS = ("layermerge.cli_solve", "layermerge.cli_latency", "layermerge.cli_train")


def _all_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    import importlib

    found = list(COMMANDS)
    for mod in OPTIONAL_COMMANDS:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        found.append(m.register)
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="layermerge",
        description="Make CNNs faster by making them shallower (LayerMerge).",
    )
    parser.add_argument("--version", action="version", version=f"layermerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _all_commands():
        register(sub)
    return parser


def _data_error() -> type[Exception]:
    try:
        from .data import DataError
    except ImportError:  # pragma: no cover
        return UserError
    return DataError


def main(argv: list[str] | None = None) -> int:
    from .models import ModelLoadError
    from .plan import PlanError
    from .trace import TraceError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (
        UserError,
        ModelLoadError,
        PlanError,
        TraceError,
        FileNotFoundError,
        _data_error(),
    ) as e:
        print(f"layermerge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
