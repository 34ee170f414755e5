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

PLAN_SCHEMA = 1
PLAN_KIND = "layermerge-plan"


class PlanError(ValueError):
    """A plan file or object that is malformed or belongs to another network."""


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
        try:
            return cls(
                start=int(d["start"]),
                end=int(d["end"]),
                kernel=int(d["kernel"]),
                stride=int(d["stride"]),
                depthwise=bool(d["depthwise"]),
                kept_convs=tuple(int(c) for c in d["kept_convs"]),
                activation=bool(d.get("activation", True)),
            )
        except KeyError as e:
            raise PlanError(f"plan block {d!r} is missing the field {e.args[0]!r}") from None


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
        for k in ("model_fingerprint", "chain_length", "blocks"):
            if k not in d:
                raise PlanError(f"plan is missing the field {k!r}")
        return cls(
            model_fingerprint=str(d["model_fingerprint"]),
            chain_length=int(d["chain_length"]),
            blocks=[PlanBlock.from_dict(b) for b in d["blocks"]],
            method=str(d.get("method", "layermerge")),
            meta=dict(d.get("meta", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json() + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

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
