"""``layermerge compress | demo``: the whole pipeline from a YAML config."""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from ..distributed import from_env, shutdown
from ..pipeline import CONFIG_DIR, ConfigError, compress, load_config, read_config_data
from .common import UsageError

DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
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
    d = subparsers.add_parser(
        "demo",
        help="the embedded demo: Fashion-MNIST, a small ResNet, all three methods",
        description="Run `compress` on the built-in demo config (see --print-config).",
    )
    d.add_argument("--run-dir", default="runs/demo")
    d.add_argument("--print-config", action="store_true", help="print the demo config and exit")
    d.add_argument(
        "--smoke",
        action="store_true",
        help="the demo shrunk by its smoke: section to check every stage in about a minute "
        "(default run directory runs/demo-smoke)",
    )
    d.set_defaults(func=cmd_demo)


def _run_compress(cfg, run_dir) -> int:
    try:
        result = compress(cfg, run_dir, log=lambda m: print(m, flush=True))
    except ConfigError as e:
        raise UsageError(str(e)) from e
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
    name = Path(args.config).name.removesuffix(".yaml").removesuffix(".yml")
    run_dir = args.run_dir or Path("runs") / (name + ("-smoke" * args.smoke))
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
        raise UsageError(str(e)) from e
    return _run_compress(cfg, run_dir)


def cmd_demo(args) -> int:
    if args.print_config:
        print(DEMO_CONFIG.read_text(), end="")
        return 0
    run_dir = args.run_dir
    if args.smoke and run_dir == "runs/demo":  # never mix a smoke run into the real one
        run_dir = "runs/demo-smoke"
    try:
        cfg = load_config(DEMO_CONFIG, smoke=args.smoke)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    return _run_compress(cfg, run_dir)
