"""Cached pipeline stages in a run directory.

A stage is identified by a name and a *key*: the hash of everything its settings
say (its settings, the keys of the stages it reads from, the layermerge version).
The record of finished stages is ``stages.json`` in the run directory, written
atomically after each stage, so an interruption loses only the stage in flight
(and long stages resume inside themselves, e.g. tables written row by row).

A run directory is self-contained and self-checking:

- every path the record holds is relative to the run directory, so the directory
  can be moved, copied or resumed from any working directory;
- each record holds the content digest of every file the stage produced
  (``outputs``) and of what it consumed: the products of the stages whose keys
  its settings hold (``consumed``). A stage is served from the record only when
  its key matches, its files are there with the recorded digests, and the stages
  it read from still hold what it read; otherwise it is redone and the log says
  why (``[redo] base: base.pt changed since it was recorded``). A file is hashed
  at most once per run while it is unchanged on disk.
- a ``stages.json`` that cannot be read is refused with one line naming it and
  the fix, never silently replaced;
- one ``compress`` at a time: the runner holds an advisory lock on the record
  (``stages.json.lock``) while it lives; a second one is refused at once with
  "another process (pid N) is running compress in RUN_DIR", or waits when asked.

Under ``torchrun`` every rank runs the same pipeline: rank 0 holds the lock,
decides whether a stage is cached, keeps the record and logs; a stage runs on
rank 0 alone while the others wait (``ranks="main"``) or on every rank
(``ranks="all"``, for stages that share their work out, such as data-parallel
training), and every rank returns rank 0's result.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..distributed import DistInfo, broadcast_object
from ..fileio import FileLock, LockError, atomic_write_text, file_digest
from ..tables import TableError

STATE_FILE = "stages.json"
#: files written beside a stage's output (a table's meta data and calibration): part
#: of what the stage produced when they exist
SIDECARS = (".meta.json", ".calib.json")
STATE_SCHEMA = 2
#: records written before outputs and inputs had digests: read, and given digests
LEGACY_SCHEMAS = (1,)


class RunDirError(RuntimeError):
    """A run directory that cannot be used as it is; the message says which file and
    what to do."""


class RunDirBusyError(RunDirError):
    """Another process is running ``compress`` in the run directory."""


class StageKey(str):
    """A stage's key as :meth:`StageRunner.key` returns it: a plain string (in JSON,
    in digests) that remembers which stage it is the key of, so a stage whose
    settings hold it is known to consume that stage's products."""

    stage: str

    def __new__(cls, value: str, stage: str) -> StageKey:
        obj = super().__new__(cls, value)
        obj.stage = stage
        return obj


def digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stage_keys(value: Any) -> Iterator[StageKey]:
    if isinstance(value, StageKey):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _stage_keys(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _stage_keys(v)


def _refuse_state(path: Path, why: str) -> RunDirError:
    return RunDirError(
        f"{path}: {why}; it is the record of the finished stages of this run directory: "
        f"delete it to start the stages over (tables resume from the rows they hold)"
    )


def _inside(rel: str) -> bool:
    """Whether ``rel`` names a file inside the run directory (relative, no ``..``)."""
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts


def read_state(path: Path) -> tuple[dict[str, dict], bool]:
    """The stage records of ``path`` and whether they are of an older schema (no
    digests yet). Refuses, naming the file, what is not such a record."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _refuse_state(path, "not a text file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _refuse_state(path, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise _refuse_state(path, "not a record of stages (no 'stages' mapping)")
    schema = data.get("schema")
    if schema != STATE_SCHEMA and schema not in LEGACY_SCHEMAS:
        raise RunDirError(
            f"{path}: schema {schema!r} is not one this layermerge reads ({STATE_SCHEMA}); "
            "it was written by another version: run that version, or use another run directory"
        )
    stages = data["stages"]
    for name, rec in stages.items():
        ok = (
            isinstance(rec, dict)
            and isinstance(rec.get("key"), str)
            and "result" in rec
            and isinstance(rec.get("outputs", {}), dict)
            and isinstance(rec.get("consumed", {}), dict)
        )
        files = (
            rec.get("result", {}).get("files", []) if ok and isinstance(rec["result"], dict) else []
        )
        if not ok or not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
            raise _refuse_state(path, f"the record of stage {name!r} is malformed")
        for f in [*files, *rec.get("outputs", {})]:
            if not _inside(f):
                raise _refuse_state(
                    path, f"stage {name!r} records {f!r}, a path outside the run directory"
                )
    return stages, schema != STATE_SCHEMA


class StageRunner:
    """Runs stages in ``run_dir``, serving those whose key, files and inputs are
    unchanged from the record. ``wait``: when another process runs in ``run_dir``,
    ``False`` refuses at once, ``True`` waits for it, a number waits that many
    seconds at most. Call :meth:`close` (or use it as a context manager) to let the
    next run in; the lock also goes with the process."""

    def __init__(
        self,
        run_dir: str | Path,
        log: Callable[[str], None] = print,
        dist: Any = None,
        *,
        wait: bool | float = False,
    ) -> None:
        self.dist = dist if dist is not None else DistInfo()
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_FILE
        self.log = log if self.dist.is_main else (lambda message: None)
        self.state: dict[str, dict] = {}
        self.ran: list[str] = []
        self.cached: list[str] = []
        self._hashes: dict[Path, tuple[tuple[int, int, int], str]] = {}
        self._lock: FileLock | None = None
        error = None
        if self.dist.is_main:  # ranks of one job share the directory: rank 0 locks it
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._take_lock(wait)
                if self.path.exists():
                    self.state, legacy = read_state(self.path)
                    if legacy:
                        self._adopt_legacy()
            except RunDirError as e:
                self.close()
                error = (isinstance(e, RunDirBusyError), str(e))
        error = broadcast_object(error, self.dist)
        if error is not None:
            raise (RunDirBusyError if error[0] else RunDirError)(error[1])

    # -- the lock ---------------------------------------------------------------------

    def _take_lock(self, wait: bool | float) -> None:
        lock = FileLock(self.path, wait=wait)
        try:
            lock.acquire()
        except LockError as e:
            pid = f"pid {e.pid}" if e.pid is not None else "pid unknown"
            raise RunDirBusyError(
                f"another process ({pid}) is running compress in {self.run_dir}; wait for it "
                "to finish (or ask to wait for it), or use another run directory"
            ) from None
        self._lock = lock

    def close(self) -> None:
        """Release the run directory for the next run."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> StageRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the record ---------------------------------------------------------------------

    def _save(self) -> None:
        atomic_write_text(
            self.path, json.dumps({"schema": STATE_SCHEMA, "stages": self.state}, indent=1)
        )

    def _adopt_legacy(self) -> None:
        """Records of the older schema hold no digests, and paths relative to the
        directory compress ran from: paths inside the run directory are made relative
        to it; the digests are taken when each stage is next checked."""
        here = self.run_dir.resolve()
        for rec in self.state.values():
            result = rec.get("result")
            if isinstance(result, dict):
                for k, v in result.items():
                    if isinstance(v, str) and v.endswith((".pt", ".csv", ".json", ".png")):
                        p = Path(v)
                        try:
                            result[k] = p.resolve().relative_to(here).as_posix()
                        except (ValueError, OSError):
                            pass
            rec["legacy"] = True

    def key(self, name: str) -> StageKey | None:
        """The key of stage ``name``; a stage whose settings hold it consumes that stage
        (its record keeps what that stage produced, and it is redone when that changes)."""
        rec = self.state.get(name)
        return StageKey(rec["key"], name) if rec else None

    def _rel(self, path: str | Path) -> str:
        p = Path(path)
        if p.is_absolute():
            try:
                p = p.relative_to(self.run_dir.resolve())
            except ValueError:
                try:
                    p = p.relative_to(self.run_dir)
                except ValueError:
                    raise ValueError(f"stage output {path} is not inside {self.run_dir}") from None
        return p.as_posix()

    def file_digest(self, rel: str) -> str | None:
        """The digest of ``rel`` (relative to the run directory), or None when it is
        missing; hashed again only when the file changed on disk."""
        path = self.run_dir / rel
        try:
            st = os.stat(path)
        except OSError:
            return None
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._hashes.get(path)
        if known is not None and known[0] == sig:
            return known[1]
        d = file_digest(path)
        self._hashes[path] = (sig, d)
        return d

    def product(self, name: str) -> str | None:
        """What stage ``name`` produced, as one digest: its key and its files' digests."""
        rec = self.state.get(name)
        if rec is None:
            return None
        return digest({"key": rec["key"], "outputs": rec.get("outputs", {})})

    def _files(self, rec: dict, outputs: list[str]) -> list[str]:
        result = rec.get("result")
        files = result.get("files", []) if isinstance(result, dict) else []
        return list(dict.fromkeys([*outputs, *files]))

    def _stale(self, rec: dict, outputs: list[str]) -> str | None:
        """Why the files or inputs of a record whose key matches are no longer the ones
        recorded (None: they are)."""
        recorded = rec.get("outputs", {})
        for f in dict.fromkeys([*self._files(rec, outputs), *recorded]):
            now = self.file_digest(f)
            if now is None:
                return f"{f} is missing"
            if f in recorded and recorded[f] != now:
                return f"{f} changed since it was recorded"
        for dep, was in rec.get("consumed", {}).items():
            if dep in self.state and self.product(dep) != was:
                return f"what {dep} produced changed since it was recorded"
        return None

    def _record_digests(self, rec: dict, outputs: list[str], consumes: list[str]) -> None:
        # a file the stage did not write is recorded as None: the next run redoes it
        files = self._files(rec, outputs)
        files += [f + s for f in files for s in SIDECARS if (self.run_dir / (f + s)).is_file()]
        rec["outputs"] = {f: self.file_digest(f) for f in files}
        rec["consumed"] = {dep: self.product(dep) for dep in consumes if dep in self.state}

    # -- stages -------------------------------------------------------------------------

    def run(
        self,
        name: str,
        inputs: dict[str, Any],
        fn: Callable[[], dict[str, Any]],
        outputs: list[str | Path] = (),
        *,
        ranks: str = "main",
    ) -> dict[str, Any]:
        """Run ``fn`` (returning a JSON-able result) unless a finished run with the same
        ``inputs`` is recorded, its ``outputs`` (and the paths the result lists under
        ``"files"``, relative to the run directory) are there with the recorded
        digests, and the stages whose keys ``inputs`` holds still hold what it read;
        return the result either way. ``ranks`` (under torchrun): ``"main"`` runs
        ``fn`` on rank 0 only, ``"all"`` on every rank."""
        if ranks not in ("main", "all"):
            raise ValueError(f"ranks must be 'main' or 'all', got {ranks!r}")
        key = digest({"stage": name, "inputs": inputs})
        outs = [self._rel(p) for p in outputs]
        consumes = list(dict.fromkeys(k.stage for k in _stage_keys(inputs)))
        cached, why = None, None
        if self.dist.is_main:
            rec = self.state.get(name)
            if rec and rec["key"] == key:
                why = self._stale(rec, outs)
                if why is None:
                    cached = rec
                    if rec.pop("legacy", False) or "outputs" not in rec:
                        self._record_digests(rec, outs, consumes)  # taken now, once
                        self._save()
        cached = broadcast_object(cached, self.dist)
        if cached is not None:
            self.state[name] = cached
            self.cached.append(name)
            self.log(f"[cached] {name}")
            return cached["result"]
        self.log(f"[redo] {name}: {why}" if why else f"[run] {name}")
        t0 = time.time()
        try:
            result = fn() if ranks == "all" or self.dist.is_main else None
        except TableError as e:
            # the longest name first: a table's sidecar before the table
            names = [f + s for f in outs for s in SIDECARS] + outs
            bad = sorted((f for f in names if f in str(e)), key=len, reverse=True)
            if not bad:
                raise
            table = next(f for f in outs if bad[0].startswith(f))
            what = "it" if bad[0] == table else f"it and {table}"
            raise TableError(
                f"{e}; {bad[0]} belongs to stage {name} of {self.run_dir}: delete {what} to "
                "start the stage over"
            ) from None
        rec = None
        if self.dist.is_main:
            rec = {
                "key": key,
                "result": result,
                "seconds": round(time.time() - t0, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self._record_digests(rec, outs, consumes)
            self.state[name] = rec
            self._save()
        # the other ranks wait here for rank 0, and take its record
        self.state[name] = broadcast_object(rec, self.dist)
        self.ran.append(name)
        return self.state[name]["result"]
