"""Parsing, checking and formatting the cells of table files (numbers, flags, conv
lists) and the sidecar values predictions add up (``constant_ms``).

Every problem is a :class:`TableError` naming where it is (``where``: the file and
line, or the sidecar field) and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

KEPT_COLUMN = "kept_convs"


class TableError(ValueError):
    """A table file that is malformed, incomplete or made for another network."""


def check_ms(v: Any, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < math.inf:
        raise TableError(
            f"{what} is {v!r}; a latency must be a finite number of ms >= 0: "
            "re-measure the table (layermerge latency) or correct the sidecar"
        )


def check_constant(meta: dict[str, Any], where: str) -> None:
    """``constant_ms``: finite, and >= 0 unless it is the measured difference
    ``identity_ms - identity_entries_ms`` (the network timed whole minus its entries,
    slightly negative where the entries timed alone add up to more than the network)."""
    c = meta["constant_ms"]
    if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
        check_ms(c, f"{where}: constant_ms")
    if c >= 0:
        return
    ident, entries = meta.get("identity_ms"), meta.get("identity_entries_ms")
    numbers = all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in (ident, entries)
    )
    if numbers and ident > 0:
        if abs(c - (ident - entries)) <= 1e-9 * max(1.0, abs(ident), abs(entries)):
            return
    raise TableError(
        f"{where}: constant_ms is {c!r}; a negative constant is only accepted as measured "
        "(identity_ms - identity_entries_ms), which this sidecar does not record: "
        "re-measure the table (layermerge latency) or correct the sidecar"
    )


def parse_int(v: Any, col: str, where: str) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            pass
    raise TableError(f"{where}: column {col!r} must be an integer, found {v!r}")


def parse_bool01(v: Any, col: str, where: str) -> bool:
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip() in ("0", "1"):
        return v.strip() == "1"
    raise TableError(f"{where}: column {col!r} must be 0 or 1, found {v!r}")


def parse_kept(v: Any, where: str) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        parts = v.split()
    elif isinstance(v, Iterable):
        parts = list(v)
    else:
        raise TableError(f"{where}: column 'kept_convs' must list conv indices, found {v!r}")
    kept = tuple(parse_int(p, KEPT_COLUMN, where) for p in parts)
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise TableError(
            f"{where}: kept_convs {' '.join(map(str, kept))} must be strictly increasing"
        )
    return kept


def parse_value(v: Any, col: str, where: str, required: bool) -> Any:
    """Numbers become int/float and must be finite; empty cells become None."""
    if v is None or (isinstance(v, str) and v.strip() == ""):
        if required:
            raise TableError(f"{where}: column {col!r} is empty; every row needs a value")
        return None
    if isinstance(v, bool | np.bool_):
        return int(v)
    num: int | float | None = None
    if isinstance(v, int | np.integer):
        num = int(v)
    elif isinstance(v, float | np.floating):
        num = float(v)
    elif isinstance(v, str):
        s = v.strip()
        try:
            num = int(s)
        except ValueError:
            try:
                num = float(s)
            except ValueError:
                num = None
    if num is None:
        if required:
            raise TableError(f"{where}: column {col!r} must be a number, found {v!r}")
        return v
    if isinstance(num, int) and abs(num) > 2**63:
        raise TableError(f"{where}: column {col!r} holds {v!r}, too large for any number type")
    if isinstance(num, float) and not math.isfinite(num):
        raise TableError(
            f"{where}: column {col!r} is {num}; NaN/inf values are not allowed "
            "(re-measure this entry or remove the row so it is measured again)"
        )
    return num


def format_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool | np.bool_):
        return "1" if v else "0"
    if isinstance(v, tuple | list):
        return " ".join(str(int(x)) for x in v)
    if isinstance(v, float | np.floating):
        return repr(float(v))
    return str(v)


def format_line(columns: Sequence[str], row: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([format_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def meta_text(meta: Mapping[str, Any]) -> str:
    return json.dumps(dict(meta), indent=2, sort_keys=True) + "\n"
