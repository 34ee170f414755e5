"""Latency, importance and options tables on disk.

A table is a CSV file plus a sidecar ``FILE.meta.json``. Rows of the option
tables are keyed by ``(start, end, kernel, stride, depthwise)`` and carry the
``kept_convs`` of the option; the per-conv importance table of the
layer-pruning baseline is keyed by ``conv``. The sidecar holds the schema
version, the table kind, the model fingerprint, the chain length and the
settings the values were measured with.

Tables are joined by key, never by row order, and loading refuses anything
that would make the solver silently wrong: unknown schema, wrong kind, missing
columns, duplicate keys, non-finite values, negative latencies and tables made
for another network. Every message names the file and line and says what to do.

Latency and importance builders append one row at a time with
:class:`TableWriter` (flushed and fsynced per row) so that an interrupted run
resumes where it stopped; :func:`read_partial` ignores a torn last line.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import FileLock, atomic_write_text, lock_path, remove_stale_temps
from .table_cells import (
    TableError,
    check_constant,
    check_ms,
    format_line,
    meta_text,
    parse_bool01,
    parse_int,
    parse_kept,
    parse_value,
)

TABLE_SCHEMA = 1
TABLE_KINDS = ("options", "latency", "importance", "conv_importance")
KEY_COLUMNS = ("start", "end", "kernel", "stride", "depthwise")
KEPT_COLUMN = "kept_convs"
CONV_COLUMN = "conv"
# The one value column each kind must have (options tables have none).
VALUE_COLUMN: dict[str, str | None] = {
    "options": None,
    "latency": "latency_ms",
    "importance": "importance",
    "conv_importance": "importance",
}
# Settings a latency value depends on: two latency tables may only be combined
# when these agree (a table is only valid for the backend, threads and batch size
# it was measured with).
LATENCY_SETTINGS = ("backend", "device", "threads", "batch_size", "dtype", "versions")
# Meta keys that describe a run rather than the measurement; they may differ
# between shards or between a run and its resumption.
VOLATILE_META_KEYS = frozenset(
    {"created", "updated", "host", "hostname", "shard", "num_shards", "elapsed_s", "wall_s"}
)

# Latency columns that predictions add up (must be >= 0 where present).
_LATENCY_VALUES = ("latency_ms", "latency_noact_ms")

OptionKey = tuple[int, int, int, int, bool]


def format_key(key: OptionKey) -> str:
    s, e, k, st, dw = key
    return f"({s}, {e}, kernel={k}, stride={st}, depthwise={int(dw)})"


def meta_path(path: str | Path) -> Path:
    """The sidecar of a table: ``path`` + ``.meta.json``."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def required_columns(kind: str) -> tuple[str, ...]:
    _check_kind(kind)
    if kind == "conv_importance":
        return (CONV_COLUMN, "importance")
    value = VALUE_COLUMN[kind]
    return (*KEY_COLUMNS, KEPT_COLUMN) + ((value,) if value else ())


@dataclass
class Table:
    """Rows of one table (typed: ints, bools, tuples, floats) and its meta."""

    kind: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    meta: dict[str, Any]
    path: Path | None = None
    source: str | None = None  # what to call it in messages when not one file
    _index: dict[Any, int] | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        if self.source is not None:
            return self.source
        return str(self.path) if self.path is not None else f"<{self.kind} table>"

    @property
    def model_fingerprint(self) -> str:
        return str(self.meta["model_fingerprint"])

    @property
    def chain_length(self) -> int:
        return int(self.meta["chain_length"])

    @property
    def constant_ms(self) -> float:
        """Latency of everything outside the chain; a table without it is refused
        (read as 0 it would silently move every budget and prediction)."""
        if "constant_ms" not in self.meta:
            raise TableError(
                f"{self.name}: the sidecar has no constant_ms (the latency of the network "
                "outside the chain), so budgets and predictions would leave it out; finish "
                "the table with `layermerge latency` (without --no-constant), or set "
                '"constant_ms": 0 in the sidecar to count the chain alone'
            )
        return float(self.meta["constant_ms"])

    @property
    def value_column(self) -> str | None:
        return VALUE_COLUMN[self.kind]

    def __len__(self) -> int:
        return len(self.rows)

    def has_column(self, name: str) -> bool:
        return name in self.columns

    def key_of(self, row: Mapping[str, Any]) -> Any:
        return _row_key(self.kind, row)

    def keys(self) -> list[Any]:
        """Option keys (or conv indices for a per-conv table), in row order."""
        return [self.key_of(r) for r in self.rows]

    def row(self, key: Any) -> dict[str, Any]:
        if self._index is None:
            self._index = {self.key_of(r): i for i, r in enumerate(self.rows)}
        return self.rows[self._index[key]]

    def column(self, name: str) -> np.ndarray:
        """A numeric column as float64, refusing missing columns and empty cells."""
        if name not in self.columns:
            raise TableError(
                f"{self.name}: has no column {name!r} (columns: {', '.join(self.columns)})"
            )
        out = np.empty(len(self.rows), dtype=np.float64)
        for i, r in enumerate(self.rows):
            v = r.get(name)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise TableError(
                    f"{self.name}: row {i + 1} has no number in column {name!r} (found {v!r})"
                )
            out[i] = v
        return out


def _row_key(kind: str, row: Mapping[str, Any]) -> Any:
    """The option key of a parsed row, or its conv index in a per-conv table."""
    if kind == "conv_importance":
        return row[CONV_COLUMN]
    return tuple(row[c] for c in KEY_COLUMNS)


# ---------------------------------------------------------------------------
# validation


def _check_kind(kind: str) -> None:
    if kind not in TABLE_KINDS:
        raise TableError(f"unknown table kind {kind!r}; expected one of {', '.join(TABLE_KINDS)}")


def _check_meta(meta: Any, where: str, kind: str | None) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise TableError(f"{where}: the meta data must be a JSON object")
    if "schema" not in meta:
        raise TableError(
            f"{where}: no 'schema' field; this is not a layermerge table sidecar "
            "(write tables with layermerge.tables.write_table)"
        )
    if meta["schema"] != TABLE_SCHEMA:
        raise TableError(
            f"{where}: table schema {meta['schema']!r} is not supported (this version reads "
            f"schema {TABLE_SCHEMA}); rebuild the table with this version of layermerge"
        )
    table = meta.get("table")
    if table not in TABLE_KINDS:
        raise TableError(
            f"{where}: unknown table kind {table!r} in field 'table'; expected one of "
            f"{', '.join(TABLE_KINDS)}"
        )
    if kind is not None and table != kind:
        raise TableError(f"{where}: this is a {table} table, but a {kind} table is needed here")
    fp = meta.get("model_fingerprint")
    if not isinstance(fp, str) or not fp:
        raise TableError(f"{where}: the field 'model_fingerprint' is missing or not a string")
    cl = meta.get("chain_length")
    if isinstance(cl, bool) or not isinstance(cl, int) or cl < 1:
        raise TableError(f"{where}: the field 'chain_length' must be a positive integer")
    # The latencies a prediction adds to the entries' (constant part, dropped convs).
    if "constant_ms" in meta:
        check_constant(meta, where)
    dropped = meta.get("dropped_ms")
    if dropped is not None:
        if not isinstance(dropped, dict):
            raise TableError(f"{where}: dropped_ms must map conv indices to ms, found {dropped!r}")
        for conv, v in dropped.items():
            check_ms(v, f"{where}: dropped_ms[{conv!r}]")
    return meta


def _normalise_row(
    kind: str, row: Mapping[str, Any], columns: Sequence[str], chain_length: int, where: str
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    value = VALUE_COLUMN[kind]
    if kind == "conv_importance":
        conv = parse_int(row.get(CONV_COLUMN), CONV_COLUMN, where)
        if not 1 <= conv <= chain_length:
            raise TableError(
                f"{where}: conv {conv} is outside the chain 1..{chain_length}; "
                "was the table made for another model?"
            )
        out[CONV_COLUMN] = conv
        key_cols: tuple[str, ...] = (CONV_COLUMN,)
    else:
        s, e, k, st = (parse_int(row.get(c), c, where) for c in KEY_COLUMNS[:4])
        dw = parse_bool01(row.get("depthwise"), "depthwise", where)
        if not 0 <= s < e <= chain_length:
            raise TableError(
                f"{where}: block ({s}, {e}) is not a span of the chain 0..{chain_length} "
                "(needs 0 <= start < end <= chain_length); was the table made for another model?"
            )
        if k < 1 or st < 1:
            raise TableError(f"{where}: kernel and stride must be >= 1, found {k} and {st}")
        kept = parse_kept(row.get(KEPT_COLUMN), where)
        if kept and not (s < kept[0] and kept[-1] <= e):
            raise TableError(
                f"{where}: kept_convs {' '.join(map(str, kept))} are not all inside the "
                f"block ({s}, {e}]"
            )
        out.update(start=s, end=e, kernel=k, stride=st, depthwise=dw, kept_convs=kept)
        key_cols = (*KEY_COLUMNS, KEPT_COLUMN)
    for col in columns:
        if col in key_cols:
            continue
        out[col] = parse_value(row.get(col), col, where, required=col == value)
    if kind == "latency":
        for col in _LATENCY_VALUES:
            if isinstance(out.get(col), int | float) and out[col] < 0:
                raise TableError(
                    f"{where}: negative latency {out[col]} ms ({col}); a latency table must "
                    "hold measured times (re-measure this entry)"
                )
    return out


def _check_columns(kind: str, columns: Sequence[str], where: str) -> tuple[str, ...]:
    columns = tuple(columns)
    missing = [c for c in required_columns(kind) if c not in columns]
    if missing:
        raise TableError(
            f"{where}: missing column(s) {', '.join(missing)} for a {kind} table "
            f"(found: {', '.join(columns) or 'none'})"
        )
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise TableError(f"{where}: duplicate column(s) {', '.join(dup)}")
    return columns


def _default_columns(kind: str, rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    cols = list(required_columns(kind))
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    return tuple(cols)


def make_table(
    kind: str,
    rows: Iterable[Mapping[str, Any]],
    meta: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    path: str | Path | None = None,
) -> Table:
    """Validate rows and meta into a :class:`Table` (in memory, nothing written)."""
    _check_kind(kind)
    rows = list(rows)
    meta = {**meta, "schema": TABLE_SCHEMA, "table": kind}
    name = str(path) if path is not None else f"<{kind} table>"
    _check_meta(meta, name, kind)
    columns = _check_columns(kind, columns or _default_columns(kind, rows), name)
    parsed = [
        _normalise_row(kind, r, columns, meta["chain_length"], f"{name}, row {i + 1}")
        for i, r in enumerate(rows)
    ]
    table = Table(kind, columns, parsed, meta, Path(path) if path is not None else None)
    _check_unique(table, [f"row {i + 1}" for i in range(len(parsed))])
    return table


def _check_unique(table: Table, labels: Sequence[str]) -> None:
    seen: dict[Any, str] = {}
    for row, label in zip(table.rows, labels):
        key = table.key_of(row)
        if key in seen:
            shown = f"conv {key}" if table.kind == "conv_importance" else format_key(key)
            raise TableError(
                f"{table.name}, {label}: duplicate key {shown} (first at {seen[key]}); "
                "each option must appear once: remove the duplicate row"
            )
        seen[key] = label


# ---------------------------------------------------------------------------
# writing


def _write_error(path: Path, e: OSError) -> TableError:
    return TableError(
        f"cannot write {e.filename or path}: {e.strerror or e}; free space or choose a "
        "writable output (an interrupted table resumes when the command is rerun)"
    )


def lock_table(path: str | Path, *, wait: bool | float = False) -> FileLock:
    """Take the lock every writer of the table ``path`` takes (see
    :class:`~layermerge.fileio.FileLock`); :class:`~layermerge.fileio.LockError`
    when another writer holds it, I/O problems as :class:`TableError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path, wait=wait).acquire()
    except OSError as e:
        raise _write_error(lock_path(path), e) from None


def remove_table(path: str | Path, *, lock: bool = True) -> None:
    """Remove a table's CSV, sidecar and the temporary files of its interrupted writes
    (e.g. a shard once merged), under its lock (``lock=False`` when the caller holds
    it): a table being written is refused with :class:`~layermerge.fileio.LockError`."""
    path = Path(path)
    held = lock_table(path) if lock else None
    try:
        for p in (path, meta_path(path)):
            p.unlink(missing_ok=True)
            remove_stale_temps(p)
    except OSError as e:
        raise TableError(f"cannot remove {e.filename or path}: {e.strerror or e}") from None
    finally:
        if held is not None:
            held.release()


def write_table(
    path: str | Path,
    kind: str,
    rows: Iterable[Mapping[str, Any]],
    meta: Mapping[str, Any],
    columns: Sequence[str] | None = None,
    *,
    lock: bool = True,
    wait: bool | float = False,
) -> Path:
    """Write a whole table (CSV + sidecar), each file atomically (temp file + rename).

    ``meta`` needs ``model_fingerprint`` and ``chain_length``; ``schema`` and
    ``table`` are filled in. ``columns`` defaults to the required columns followed
    by any other keys of the rows in order of first appearance. The table's lock is
    taken (``lock=False`` when the caller holds it); another writer makes this
    fail with :class:`~layermerge.fileio.LockError`, or wait (``wait``).
    """
    path = Path(path)
    table = make_table(kind, rows, meta, columns, path)
    text = format_line(table.columns, {c: c for c in table.columns})
    text += "".join(format_line(table.columns, r) for r in table.rows)
    held = lock_table(path, wait=wait) if lock else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
        atomic_write_text(meta_path(path), meta_text(table.meta))
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        if held is not None:
            held.release()
    return path


# ---------------------------------------------------------------------------
# reading


def _read_meta(path: Path, kind: str | None) -> dict[str, Any]:
    mp = meta_path(path)
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TableError(
            f"{path}: the sidecar {mp.name} is missing; tables need their metadata "
            "(write them with layermerge.tables.write_table)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TableError(
            f"{mp}: not valid JSON ({e}); rebuild the table or restore its sidecar"
        ) from None
    except OSError as e:
        raise TableError(f"cannot read {mp}: {e.strerror or e}") from None
    return _check_meta(meta, str(mp), kind)


def _read(path: str | Path, kind: str | None, partial: bool) -> Table:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TableError(f"table file {path} does not exist") from None
    except UnicodeDecodeError:
        raise TableError(f"{path}: not a text (CSV) file; rebuild the table") from None
    except OSError as e:
        raise TableError(f"cannot read table file {path}: {e.strerror or e}") from None
    meta = _read_meta(path, kind)
    kind = meta["table"]
    if text and not text.endswith("\n"):
        # Every writer here ends lines with a newline, so a last line without one was
        # torn by a crash while appending, and a torn number can still parse (1.5 -> 1).
        if not partial:
            raise TableError(
                f"{path}, line {text.count(chr(10)) + 1}: the last line has no newline, so it "
                "may be torn by an interrupted run; rerun the builder to resume it (or add "
                "the newline if the line is complete)"
            )
        text = text[: text.rfind("\n") + 1]
    reader = csv.reader(io.StringIO(text))
    try:
        return _parse_rows(path, kind, meta, reader, partial)
    except csv.Error as e:
        raise TableError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None


def _parse_rows(path: Path, kind: str, meta: dict[str, Any], reader: Any, partial: bool) -> Table:
    header = next(reader, None)
    if header is None:
        if partial:
            return Table(kind, required_columns(kind), [], meta, path)
        raise TableError(f"{path}: the file is empty (no header line)")
    columns = _check_columns(kind, [h.strip() for h in header], f"{path}, line 1")
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    for fields in reader:
        where = f"{path}, line {reader.line_num}"
        if not fields:
            continue
        if len(fields) != len(columns):
            raise TableError(f"{where}: {len(fields)} fields, the header has {len(columns)}")
        row = dict(zip(columns, fields))
        rows.append(_normalise_row(kind, row, columns, meta["chain_length"], where))
        labels.append(f"line {reader.line_num}")
    table = Table(kind, columns, rows, meta, path)
    _check_unique(table, labels)
    return table


def read_table(path: str | Path, kind: str | None = None) -> Table:
    """Load and validate a table; ``kind`` refuses a table of another kind."""
    return _read(path, kind, partial=False)


def read_partial(path: str | Path, kind: str | None = None) -> Table:
    """Like :func:`read_table` but ignores a torn last line left by an interrupted writer."""
    return _read(path, kind, partial=True)


class TableWriter:
    """Append rows one at a time, crash-safely, resuming an existing file.

    Each row is written as one line, flushed and fsynced, so at most the line
    being written is lost on a crash; on reopening, a torn last line is cut
    off and :attr:`done` holds the keys already measured. Reopening with other
    columns or with settings (meta values) that differ from the file's is
    refused, so one table never mixes measurements made under different settings.

    The writer holds the table's lock (``NAME.lock``) until :meth:`close`: a second
    writer of the same file, in this process or another, is refused at once with
    :class:`~layermerge.fileio.LockError`, or waits for it (``wait``: ``True`` or
    at most that many seconds). A caller that took the lock earlier (to be refused
    before any work) passes it as ``lock``; it stays the caller's to release.
    """

    def __init__(
        self,
        path: str | Path,
        kind: str,
        meta: Mapping[str, Any],
        columns: Sequence[str] | None = None,
        *,
        wait: bool | float = False,
        lock: FileLock | None = None,
    ) -> None:
        _check_kind(kind)
        self.path = Path(path)
        self.kind = kind
        self.columns = _check_columns(kind, columns or required_columns(kind), str(self.path))
        meta = {**meta, "schema": TABLE_SCHEMA, "table": kind}
        _check_meta(meta, str(self.path), kind)
        self._file: Any = None
        if lock is not None and not (
            lock.held and os.path.abspath(lock.target) == os.path.abspath(self.path)
        ):
            raise ValueError(
                f"the lock given to the writer of {self.path} must be that table's lock "
                "(lock_table), held by the caller"
            )
        self._own_lock = lock is None
        self._lock = lock if lock is not None else lock_table(self.path, wait=wait)
        try:
            self._open(meta)
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        if self._own_lock:
            self._lock.release()

    def _open(self, meta: dict[str, Any]) -> None:
        self.done: set[Any] = set()
        try:
            for p in (self.path, meta_path(self.path)):
                remove_stale_temps(p)  # ours: we hold the lock
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            if fresh:
                atomic_write_text(meta_path(self.path), meta_text(meta))
                header = format_line(self.columns, {c: c for c in self.columns})
                atomic_write_text(self.path, header)
            else:
                existing = read_partial(self.path, self.kind)
                self._check_resumable(existing, meta)
                merged = {**existing.meta, **meta}
                if merged != existing.meta:
                    atomic_write_text(meta_path(self.path), meta_text(merged))
                meta = merged
                self._cut_torn_line()
                self.done = set(existing.keys())
            self.meta = meta
            self._file = open(self.path, "a", newline="", encoding="utf-8")
        except OSError as e:
            raise _write_error(self.path, e) from None

    def _check_resumable(self, existing: Table, meta: Mapping[str, Any]) -> None:
        if existing.columns != self.columns:
            raise TableError(
                f"cannot resume {self.path}: it has columns {', '.join(existing.columns)}, "
                f"this run writes {', '.join(self.columns)}; use a new file"
            )
        for k, v in meta.items():
            if k in existing.meta and k not in VOLATILE_META_KEYS and existing.meta[k] != v:
                raise TableError(
                    f"cannot resume {self.path}: it was made with {k}={existing.meta[k]!r}, "
                    f"this run has {k}={v!r}; use the same settings or a new file"
                )

    def _cut_torn_line(self) -> None:
        with open(self.path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def write(self, row: Mapping[str, Any]) -> None:
        """Validate and append one row (durable when this returns)."""
        if self._file is None:
            raise TableError(f"{self.path}: the writer is closed")
        parsed = _normalise_row(
            self.kind, row, self.columns, self.meta["chain_length"], f"{self.path}, new row"
        )
        key = _row_key(self.kind, parsed)
        if key in self.done:
            raise TableError(f"{self.path}: a row for {key} is already in the table")
        size = os.fstat(self._file.fileno()).st_size  # every row before is flushed
        try:
            self._file.write(format_line(self.columns, parsed))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            # Take the row back out, so the file holds exactly the rows written.
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)
            raise _write_error(self.path, e) from None
        self.done.add(key)

    def update_meta(self, **values: Any) -> None:
        """Add values measured during the run (e.g. ``constant_ms``) to the sidecar."""
        meta = {**self.meta, **values}
        _check_meta(meta, str(meta_path(self.path)), self.kind)
        try:
            atomic_write_text(meta_path(self.path), meta_text(meta))
        except OSError as e:
            raise _write_error(meta_path(self.path), e) from None
        self.meta = meta

    def close(self) -> None:
        """Close the file and release the lock (a torn line left by a failed write
        is cut off when the table is next opened)."""
        try:
            if self._file is not None:
                self._file.close()
        except OSError:
            pass  # every row written was flushed and fsynced already
        finally:
            self._file = None
            self._release()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------
# combining tables


def check_same_model(a: Table, b: Table) -> None:
    """Refuse two tables made for different networks."""
    if a.model_fingerprint != b.model_fingerprint:
        raise TableError(
            f"{a.name} and {b.name} were made for different models (fingerprints "
            f"{a.model_fingerprint} and {b.model_fingerprint}); build both for the same model"
        )
    if a.chain_length != b.chain_length:
        raise TableError(
            f"{a.name} and {b.name} describe chains of different length "
            f"({a.chain_length} and {b.chain_length}); build both for the same model"
        )


def check_same_settings(a: Table, b: Table, keys: Iterable[str] = LATENCY_SETTINGS) -> None:
    """Refuse two tables whose meta differs in any of ``keys`` (absent counts as a value)."""
    diffs = [
        f"{k} {a.meta.get(k, '<unset>')!r} vs {b.meta.get(k, '<unset>')!r}"
        for k in keys
        if a.meta.get(k) != b.meta.get(k)
    ]
    if diffs:
        raise TableError(
            f"{a.name} and {b.name} were measured with different settings ({'; '.join(diffs)}); "
            "values are only comparable under the same settings: re-measure one of them"
        )


def concat_tables(tables: Sequence[Table]) -> Table:
    """Combine shards of one table (same kind, model and settings; no key twice).

    Latency shards must agree on :data:`LATENCY_SETTINGS`; other kinds on every
    meta key they share, except run-specific ones (:data:`VOLATILE_META_KEYS`).
    """
    if not tables:
        raise TableError("no tables to combine")
    first = tables[0]
    if len(tables) == 1:
        return first
    meta = dict(first.meta)
    rows = list(first.rows)
    labels = [f"row {i + 1} of {first.name}" for i in range(len(first.rows))]
    for t in tables[1:]:
        if t.kind != first.kind:
            raise TableError(
                f"cannot combine the {first.kind} table {first.name} with the "
                f"{t.kind} table {t.name}"
            )
        check_same_model(first, t)
        if first.columns != t.columns:
            raise TableError(f"cannot combine {first.name} and {t.name}: their columns differ")
        if first.kind == "latency":
            keys: Iterable[str] = LATENCY_SETTINGS
        else:
            keys = [k for k in first.meta if k in t.meta and k not in VOLATILE_META_KEYS]
        check_same_settings(first, t, keys)
        if "constant_ms" in t.meta:
            if "constant_ms" in meta and meta["constant_ms"] != t.meta["constant_ms"]:
                raise TableError(
                    f"{first.name} and {t.name} give different constant_ms "
                    f"({meta['constant_ms']} and {t.meta['constant_ms']}); keep it in one shard"
                )
            meta["constant_ms"] = t.meta["constant_ms"]
        rows += t.rows
        labels += [f"row {i + 1} of {t.name}" for i in range(len(t.rows))]
    out = Table(first.kind, first.columns, rows, meta, source=" + ".join(t.name for t in tables))
    _check_unique(out, labels)
    return out


def _sorted_by_key(table: Table) -> Table:
    rows = sorted(table.rows, key=table.key_of)
    return Table(table.kind, table.columns, rows, table.meta, table.path, table.source)


def _list_keys(keys: Iterable[OptionKey], limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ", ".join(format_key(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def join_tables(latency: Table, importance: Table) -> tuple[Table, Table]:
    """Match a latency and an importance table option by option.

    Returns both tables with rows sorted by key, so row ``i`` of one is the
    same option as row ``i`` of the other. Refuses tables for different
    models (the fingerprint covers every shape) and keys present in only one of
    them: everything an option's latency depends on (span, merged kernel, stride,
    depthwise, shapes) must agree.

    Which convs an option keeps does not change its latency; it is chosen on the
    weights (largest L1 norm), so it comes from the importance table, measured on
    the weights the plan will be applied to. The returned latency rows carry the
    importance table's ``kept_convs``. A latency table measured on an untrained
    model therefore joins with importance tables of any trained weights. Options
    that keep a different *number* of convs in the two tables are refused: no
    choice of weights explains that, the tables describe different options.
    """
    if latency.kind != "latency":
        raise TableError(f"{latency.name} is a {latency.kind} table, not a latency table")
    if importance.kind != "importance":
        raise TableError(f"{importance.name} is a {importance.kind} table, not an importance table")
    check_same_model(latency, importance)
    lat_keys, imp_keys = set(latency.keys()), set(importance.keys())
    for have, lack, keys in (
        (latency, importance, lat_keys - imp_keys),
        (importance, latency, imp_keys - lat_keys),
    ):
        if keys:
            raise TableError(
                f"{lack.name} has no row for {len(keys)} option(s) of {have.name}: "
                f"{_list_keys(keys)}; build both tables from the same options table "
                "(or finish the interrupted one)"
            )
    lat, imp = _sorted_by_key(latency), _sorted_by_key(importance)
    rows = []
    for a, b in zip(lat.rows, imp.rows):
        if a[KEPT_COLUMN] == b[KEPT_COLUMN]:
            rows.append(a)
            continue
        if len(a[KEPT_COLUMN]) != len(b[KEPT_COLUMN]):
            raise TableError(
                f"option {format_key(lat.key_of(a))} keeps {len(a[KEPT_COLUMN])} conv(s) "
                f"{list(a[KEPT_COLUMN])} in {lat.name} but {len(b[KEPT_COLUMN])} "
                f"{list(b[KEPT_COLUMN])} in {imp.name}; the tables describe different "
                "options: build both from the same model (any weights)"
            )
        rows.append({**a, KEPT_COLUMN: b[KEPT_COLUMN]})
    lat = Table(lat.kind, lat.columns, rows, lat.meta, lat.path, lat.source)
    return lat, imp
