"""Cached pipeline stages in a run directory.

A stage is identified by a name and a *key*: the hash of everything its result
depends on (its settings, the keys of the stages it reads from, the layermerge
version). A stage whose key and output files are unchanged is not run again;
the record of finished stages is ``stages.json`` in the run directory, written
atomically after each stage, so an interruption loses only the stage in flight
(and long stages resume inside themselves, e.g. tables written row by row).

Under ``torchrun`` every rank runs the same pipeline: rank 0 decides whether a
stage is cached, keeps the record and logs; a stage runs on rank 0 alone while
the others wait (``ranks="main"``) or on every rank (``ranks="all"``, for stages
that share their work out, such as data-parallel training), and every rank
returns rank 0's result.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..distributed import DistInfo, broadcast_object
from ..fileio import file_digest  # noqa: F401  (its home is fileio)

STATE_FILE = "stages.json"
STATE_SCHEMA = 1


def digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageRunner:
    """Runs stages in ``run_dir``, skipping those whose key and outputs are unchanged."""

    def __init__(
        self, run_dir: str | Path, log: Callable[[str], None] = print, dist: Any = None
    ) -> None:
        self.dist = dist if dist is not None else DistInfo()
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / STATE_FILE
        self.log = log if self.dist.is_main else (lambda message: None)
        self.state: dict[str, dict] = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("schema") == STATE_SCHEMA:
                self.state = data.get("stages", {})
        self.ran: list[str] = []
        self.cached: list[str] = []

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema": STATE_SCHEMA, "stages": self.state}, indent=1))
        tmp.replace(self.path)

    def key(self, name: str) -> str | None:
        rec = self.state.get(name)
        return rec["key"] if rec else None

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
        ``inputs`` is recorded and its ``outputs`` (and the paths the result lists under
        ``"files"``) exist; return the result either way. ``ranks`` (under torchrun):
        ``"main"`` runs ``fn`` on rank 0 only, ``"all"`` on every rank."""
        if ranks not in ("main", "all"):
            raise ValueError(f"ranks must be 'main' or 'all', got {ranks!r}")
        key = digest({"stage": name, "inputs": inputs})
        cached = None
        if self.dist.is_main:
            rec = self.state.get(name)
            paths = [self.run_dir / p for p in outputs]
            if rec and rec["key"] == key:
                # files the stage reported writing must still be there too
                paths += [self.run_dir / p for p in rec["result"].get("files", [])]
            if rec and rec["key"] == key and all(p.exists() for p in paths):
                cached = rec
        cached = broadcast_object(cached, self.dist)
        if cached is not None:
            self.state[name] = cached
            self.cached.append(name)
            self.log(f"[cached] {name}")
            return cached["result"]
        self.log(f"[run] {name}")
        t0 = time.time()
        result = fn() if ranks == "all" or self.dist.is_main else None
        rec = None
        if self.dist.is_main:
            rec = {
                "key": key,
                "result": result,
                "seconds": round(time.time() - t0, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            self.state[name] = rec
            self._save()
        # the other ranks wait here for rank 0, and take its record
        self.state[name] = broadcast_object(rec, self.dist)
        self.ran.append(name)
        return self.state[name]["result"]
