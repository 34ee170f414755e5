"""``layermerge`` command line: a thin layer over the library.

Every command that takes a MODEL accepts ``--model-kwargs``, ``--weights``,
``--input-shape``, ``--include-stem``, ``--include-head`` and ``--freeze``.
Errors the user can fix print one line to stderr and exit with status 2.

One module per group of commands, each with ``register(subparsers)``; what they
share is in :mod:`layermerge.cli.common`.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..data import DataError
from ..models import ModelLoadError
from ..plan import PlanError
from ..trace import TraceError
from . import compress, diffusion, latency, model, solve, train
from .common import UserError, add_model_args, load_traced

__all__ = ["UserError", "add_model_args", "build_parser", "load_traced", "main"]

#: the command groups, in the order ``layermerge --help`` lists them
COMMAND_MODULES = (model, compress, solve, latency, train, diffusion)

#: exit status of an error the user can fix (bad argument, missing file, ...)
USER_ERROR = 2

#: errors that print one line and exit with USER_ERROR
USER_ERRORS = (UserError, ModelLoadError, PlanError, TraceError, FileNotFoundError, DataError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layermerge",
        description="Make CNNs faster by making them shallower (LayerMerge).",
    )
    parser.add_argument("--version", action="version", version=f"layermerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for m in COMMAND_MODULES:
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"layermerge {args.command}: error: {e}", file=sys.stderr)
        return USER_ERROR
