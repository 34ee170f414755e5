"""``layermerge`` command line: a thin layer over the library.

Every command that takes a MODEL accepts ``--model-kwargs``, ``--weights``,
``--input-shape``, ``--include-stem``, ``--include-head`` and ``--freeze``.

Errors print one line to stderr, ``layermerge COMMAND: error: WHAT``, naming the
file or value at fault and what to do, and exit with status 2 when the command
line is wrong (a flag, a value, a name, a file that does not exist) or 1 when the
work failed (a file that cannot be read or written, corrupt or inconsistent
inputs, a data problem, out of memory). With ``--json`` the error is instead one
JSON object ``{"error": ..., "hint": ..., "exit_code": ...}`` on stdout, where the
result would have been. ``--debug`` anywhere on the command line (or the
environment variable ``LAYERMERGE_DEBUG=1``) prints the traceback as well.

One module per group of commands, each with ``register(subparsers)``; what they
share is in :mod:`layermerge.cli.common`.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import compress, diffusion, env, latency, model, solve, train
from .common import (
    UsageError,
    UserError,
    add_model_args,
    check_input_paths,
    check_output_paths,
    load_traced,
)
from .errors import (
    RUNTIME_ERROR,
    USAGE_ERROR,
    error_of,
    report_error,
)

__all__ = [
    "UsageError",
    "RUNTIME_ERROR",
    "USAGE_ERROR",
    "UserError",
    "add_model_args",
    "build_parser",
    "error_of",
    "load_traced",
    "main",
    "report_error",
]

#: the command groups, in the order ``layermerge --help`` lists them
COMMAND_MODULES = (model, compress, solve, latency, train, diffusion, env)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors reach :func:`main` as usage errors (one line,
    or a JSON object with --json) instead of printing the usage and exiting."""

    def error(self, message: str):
        e = UsageError(message, hint=f"see `{self.prog} --help`")
        e.prog = self.prog  # "layermerge" or "layermerge COMMAND"
        raise e


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layermerge",
        description="Make CNNs faster by making them shallower (LayerMerge).",
        epilog="Exit status: 0 success, 1 the work failed, 2 the command line is wrong. "
        "With --json an error is one JSON object {error, hint, exit_code} on stdout. "
        "--debug (anywhere) or LAYERMERGE_DEBUG=1 shows the traceback of an error.",
    )
    parser.add_argument("--version", action="version", version=f"layermerge {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="print the traceback of an error (also accepted after COMMAND)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for m in COMMAND_MODULES:
        m.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LAYERMERGE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    as_json = "--json" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        # the subcommand's parser names itself; the top one (unrecognized arguments)
        # does not, and the command is the first word that names one
        command = getattr(e, "prog", "layermerge").removeprefix("layermerge").strip()
        if not command:
            names = parser._subparsers._group_actions[0].choices
            command = next((a for a in argv if a in names), None)
        return report_error(command or None, e, as_json=as_json, debug=debug)
    try:
        check_input_paths(args)
        check_output_paths(args)
        return int(args.func(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        return report_error(args.command, e, as_json=getattr(args, "json", False), debug=debug)
