"""Plans: a partition of the chain ``0..L`` into blocks, one option each.

A plan is a small typed object and a JSON file with a schema version and the
fingerprint of the chain it was made for. Loading a plan for another network is
refused by :func:`check_plan_for_chain`; checking that each block is a valid
block with an existing option is :func:`layermerge.space.SearchSpace.check_plan`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_write_text

PLAN_SCHEMA = 1
PLAN_KIND = "layermerge-plan"
#: the solve methods whose plans may replace a single conv by the identity (a block
#: with no kept conv), scored by the per-conv importance table
DROP_METHODS = ("layerprune", "layermerge-drop")


class PlanError(ValueError):
    """A plan file or object that is malformed or belongs to another network."""


_BLOCK_FIELDS = ("start", "end", "kernel", "stride", "depthwise", "kept_convs", "activation")
_PLAN_FIELDS = ("schema", "kind", "model_fingerprint", "chain_length", "method", "meta", "blocks")


def _unknown_keys(d: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    extra = sorted(set(d) - set(known))
    if extra:
        raise PlanError(f"{where} has unknown field(s) {extra}; the known fields are {list(known)}")


def _int(v: Any, name: str, where: str) -> int:
    # bool is an int subclass and 0.7 would truncate to 0: both are refused
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{where}: {name!r} must be an integer, got {v!r}")
    return v


def _bool(v: Any, name: str, where: str) -> bool:
    # "false" would be truthy: only JSON true/false are accepted
    if not isinstance(v, bool):
        raise PlanError(f"{where}: {name!r} must be true or false, got {v!r}")
    return v


@dataclass(frozen=True)
class PlanBlock:
    """Span ``(start, end]`` merged into one conv of ``kernel``/``stride``.

    ``kept_convs`` are the chain indices of the convs kept (the rest become
    identity). An empty ``kept_convs`` means the whole span is identity: only
    the layer-pruning baseline and model families that allow it produce that.
    """

    start: int
    end: int
    kernel: int
    stride: int
    depthwise: bool
    kept_convs: tuple[int, ...]
    # Whether the activation at the block's end node stays. Always true for LayerMerge;
    # the activation-only baseline (kim23) may realise one activation-free span as
    # several merged convs, which gives inner blocks without an end activation.
    activation: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise PlanError(f"block ({self.start}, {self.end}): needs 0 <= start < end")
        for c in self.kept_convs:
            if not self.start < c <= self.end:
                raise PlanError(
                    f"block ({self.start}, {self.end}): kept conv {c} is outside the span"
                )
        if list(self.kept_convs) != sorted(set(self.kept_convs)):
            raise PlanError(
                f"block ({self.start}, {self.end}): kept_convs must be increasing and unique"
            )

    @property
    def key(self) -> tuple[int, int, int, int, bool]:
        """The table key of this block's option."""
        return (self.start, self.end, self.kernel, self.stride, self.depthwise)

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "kernel": self.kernel,
            "stride": self.stride,
            "depthwise": self.depthwise,
            "kept_convs": list(self.kept_convs),
            "activation": self.activation,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanBlock:
        """Parse strictly: exact types, no unknown fields (a typo is an error, not a
        default)."""
        if not isinstance(d, dict):
            raise PlanError(f"a plan block must be a JSON object, got {d!r}")
        where = f"plan block {d!r}"
        _unknown_keys(d, _BLOCK_FIELDS, where)
        for k in _BLOCK_FIELDS[:-1]:
            if k not in d:
                raise PlanError(f"{where} is missing the field {k!r}")
        kept = d["kept_convs"]
        if not isinstance(kept, list):
            raise PlanError(f"{where}: 'kept_convs' must be a list of integers, got {kept!r}")
        return cls(
            start=_int(d["start"], "start", where),
            end=_int(d["end"], "end", where),
            kernel=_int(d["kernel"], "kernel", where),
            stride=_int(d["stride"], "stride", where),
            depthwise=_bool(d["depthwise"], "depthwise", where),
            kept_convs=tuple(_int(c, "kept_convs", where) for c in kept),
            activation=_bool(d.get("activation", True), "activation", where),
        )


@dataclass
class Plan:
    """A partition of nodes ``0..chain_length`` into blocks."""

    model_fingerprint: str
    chain_length: int
    blocks: list[PlanBlock]
    method: str = "layermerge"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks = sorted(self.blocks, key=lambda b: b.start)
        pos = 0
        for b in self.blocks:
            if b.start != pos:
                raise PlanError(
                    f"blocks do not partition 0..{self.chain_length}: expected a block "
                    f"starting at node {pos}, found ({b.start}, {b.end})"
                )
            pos = b.end
        if pos != self.chain_length:
            raise PlanError(
                f"blocks do not partition 0..{self.chain_length}: the last block ends at {pos}"
            )

    @property
    def kept_activations(self) -> list[int]:
        """Nodes whose activation remains: the block ends (node L included)."""
        return [b.end for b in self.blocks if b.activation]

    @property
    def kept_convs(self) -> list[int]:
        return [c for b in self.blocks for c in b.kept_convs]

    def block_of(self, conv: int) -> PlanBlock:
        for b in self.blocks:
            if b.start < conv <= b.end:
                return b
        raise KeyError(conv)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PLAN_SCHEMA,
            "kind": PLAN_KIND,
            "model_fingerprint": self.model_fingerprint,
            "chain_length": self.chain_length,
            "method": self.method,
            "meta": self.meta,
            "blocks": [b.to_dict() for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict) or d.get("kind") != PLAN_KIND:
            raise PlanError('not a layermerge plan (missing "kind": "layermerge-plan")')
        if d.get("schema") != PLAN_SCHEMA:
            raise PlanError(
                f"plan schema {d.get('schema')!r} is not supported (this version reads "
                f"schema {PLAN_SCHEMA})"
            )
        _unknown_keys(d, _PLAN_FIELDS, "plan")
        for k in ("model_fingerprint", "chain_length", "blocks"):
            if k not in d:
                raise PlanError(f"plan is missing the field {k!r}")
        if not isinstance(d["model_fingerprint"], str):
            raise PlanError(
                f"plan: 'model_fingerprint' must be a string, got {d['model_fingerprint']!r}"
            )
        if not isinstance(d["blocks"], list):
            raise PlanError(f"plan: 'blocks' must be a list, got {d['blocks']!r}")
        method = d.get("method", "layermerge")
        if not isinstance(method, str):
            raise PlanError(f"plan: 'method' must be a string, got {method!r}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise PlanError(f"plan: 'meta' must be an object, got {meta!r}")
        return cls(
            model_fingerprint=d["model_fingerprint"],
            chain_length=_int(d["chain_length"], "chain_length", "plan"),
            blocks=[PlanBlock.from_dict(b) for b in d["blocks"]],
            method=method,
            meta=dict(meta),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except IsADirectoryError:
            raise PlanError(f"plan file {path} is a directory, not a plan file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        except OSError as e:
            raise PlanError(f"cannot read plan file {path}: {e.strerror or e}") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None

    def summary(self) -> str:
        merged = sum(1 for b in self.blocks if b.length > 1)
        return (
            f"{len(self.blocks)} blocks ({merged} merged), "
            f"{len(self.kept_convs)}/{self.chain_length} convs kept, "
            f"{len(self.kept_activations)}/{self.chain_length} activations kept"
        )


def check_plan_for_chain(plan: Plan, fingerprint: str, chain_length: int) -> None:
    """Refuse a plan made for another network."""
    if plan.model_fingerprint != fingerprint:
        raise PlanError(
            f"the plan was made for the model with fingerprint {plan.model_fingerprint}, "
            f"but this model's chain has fingerprint {fingerprint}: make the plan for this "
            "model (same architecture, input shape and frozen convs)"
        )
    if plan.chain_length != chain_length:
        raise PlanError(
            f"the plan covers a chain of length {plan.chain_length}, this model's chain has "
            f"length {chain_length}"
        )
