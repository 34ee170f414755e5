"""How a command's failure reaches the user: one line on stderr (or one JSON object
on stdout with ``--json``) naming what is wrong and what to do, and the exit status:
2 when the command line is wrong, 1 when the work failed."""

from __future__ import annotations

import errno
import json
import sys
import traceback

import torch

from ..data import DataError, DataSpecError
from ..export import ExportError
from ..families import MergeVerificationError, TraceError
from ..latency import BackendError
from ..models import ModelLoadError, WeightsError
from ..pipeline import ConfigError
from ..plan import PlanError
from ..solve import InfeasibleBudgetError
from ..tables import TableError
from ..train import TrainingError
from .common import UsageError, UserError

#: exit status of a usage error (bad flag, value, name, missing input file)
USAGE_ERROR = 2
#: exit status of a runtime failure (I/O, corrupt input, data, memory, ...)
RUNTIME_ERROR = 1

#: library errors that mean the command line or config is wrong
USAGE_ERRORS = (
    UsageError,
    ConfigError,
    TraceError,
    InfeasibleBudgetError,
    DataSpecError,
    FileNotFoundError,
)
#: library errors whose message already says what went wrong and what to do
RUNTIME_ERRORS = (
    UserError,
    ModelLoadError,
    PlanError,
    TableError,
    DataError,
    TrainingError,
    ExportError,
    BackendError,
    MergeVerificationError,
)

_DEBUG_HINT = "rerun with --debug (or LAYERMERGE_DEBUG=1) for the traceback"


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0] + " ..."


def _os_error(e: OSError) -> tuple[str, str]:
    """The message and hint of an operating-system error, naming its file."""
    name = e.filename if e.filename is not None else "a file"
    what = e.strerror or str(e)
    if e.filename2 is not None:
        name = f"{name} -> {e.filename2}"
    hints = {
        errno.ENOSPC: "free some space or write elsewhere",
        errno.EDQUOT: "free some space or write elsewhere",
        errno.EROFS: "the file system is read-only: write elsewhere",
        errno.EACCES: "check the permissions, or write elsewhere",
        errno.EPERM: "check the permissions, or write elsewhere",
        errno.EISDIR: "give a file path, not a directory",
        errno.ENOTDIR: "a component of the path is a file, not a directory: fix the path",
        errno.ENOENT: "check the path",
    }
    return f"{name}: {what}", hints.get(e.errno, "check the path and the disk")


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def error_of(e: BaseException) -> tuple[str, str | None, int]:
    """``(message, hint, exit status)`` of an exception raised by a command."""
    hint = getattr(e, "hint", None)
    if isinstance(e, OSError):
        msg, os_hint = _os_error(e)
        code = USAGE_ERROR if isinstance(e, FileNotFoundError) else RUNTIME_ERROR
        return msg, hint or os_hint, code
    usage = isinstance(e, USAGE_ERRORS) or (
        isinstance(e, ModelLoadError) and not isinstance(e, WeightsError)
    )
    # the library's own errors say what is wrong and what to do
    ours = type(e).__module__.startswith("layermerge.")
    if usage or ours or isinstance(e, RUNTIME_ERRORS):
        return _one_line(str(e)), hint, USAGE_ERROR if usage else RUNTIME_ERROR
    if _is_out_of_memory(e):
        return (
            f"out of memory: {_one_line(str(e))}",
            "use a smaller --input-shape or --batch-size (or a device with more memory)",
            RUNTIME_ERROR,
        )
    if isinstance(e, KeyboardInterrupt):
        return "interrupted", "rerun the same command to resume where it can", 130
    return f"{type(e).__name__}: {_one_line(str(e))}", _DEBUG_HINT, RUNTIME_ERROR


def report_error(command: str | None, e: BaseException, *, as_json: bool, debug: bool) -> int:
    msg, hint, code = error_of(e)
    if debug:
        traceback.print_exception(e)
    if as_json:
        print(json.dumps({"error": msg, "hint": hint, "exit_code": code}), flush=True)
    else:
        where = f"layermerge {command}" if command else "layermerge"
        tail = f" ({hint})" if hint and hint not in msg else ""
        print(f"{where}: error: {msg}{tail}", file=sys.stderr, flush=True)
    return code
