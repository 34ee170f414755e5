"""The chain: LayerMerge's description of a network.

A chain has nodes ``0..L``; conv ``i`` (``1 <= i <= L``) maps node ``i-1`` to
node ``i``. Node ``i`` carries the activation that follows conv ``i`` (or
none), residual skips add node ``p``'s tensor to the pre-activation of node
``q``, and breaks are nodes that no block may span. This module holds only the
data types; :mod:`layermerge.trace` builds them from a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

CHAIN_SCHEMA = 1

#: Activations ``f`` with ``f(f(x)) == f(x)`` exactly. Where a plan drops a conv whose
#: node adds nothing, the node's activation then follows the same activation of the
#: node before: the deploy network omits it, and it costs nothing.
IDEMPOTENT_ACTIVATIONS = frozenset({"relu", "relu6"})


def repeats_activation(previous: str | None, current: str | None) -> bool:
    """Whether activation ``current`` applied right after ``previous`` changes nothing
    (the same idempotent activation)."""
    return bool(current) and current == previous and current in IDEMPOTENT_ACTIVATIONS


@dataclass(frozen=True)
class ConvSpec:
    """Conv ``index`` of the chain: maps node ``index - 1`` to node ``index``."""

    index: int
    path: str  # module path of the nn.Conv2d in the model
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    bias: bool
    bn_path: str | None = None  # BatchNorm2d that follows (folded in eval mode)
    frozen: bool = False  # chosen by the user: counts as irreducible
    allow_empty: bool = False  # the model family allows pruning it to identity alone

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @property
    def grouped(self) -> bool:
        """Grouped but not depthwise: never merged with other convs."""
        return self.groups > 1 and not self.depthwise

    @property
    def irreducible(self) -> bool:
        """Cannot be replaced by identity."""
        return (
            self.in_channels != self.out_channels or self.stride > 1 or self.frozen or self.grouped
        )


@dataclass(frozen=True)
class Skip:
    """Residual connection: node ``start``'s tensor is added to the pre-activation of
    node ``end``, directly (identity) or through a projection conv (+BN)."""

    start: int
    end: int
    projection: str | None = None  # module path of the projection conv
    projection_bn: str | None = None
    projection_kernel: int = 1
    projection_stride: int = 1
    projection_padding: int = 0


@dataclass(frozen=True)
class Node:
    """Node ``index``: the tensor after conv ``index`` (node 0: the chain's input)."""

    index: int
    activation: str | None  # "relu", "relu6", "silu", "gelu", "hardswish", ... or None
    shape: tuple[int, ...]  # (C, H, W) of the tensor the next conv reads
    is_break: bool = False
    break_reason: str | None = None


@dataclass
class Chain:
    """Nodes ``0..L``, convs ``1..L``, skips and breaks of a traced network."""

    nodes: list[Node]
    convs: list[ConvSpec]  # convs[i - 1] is conv i
    skips: list[Skip]
    input_shape: tuple[int, ...]  # (C, H, W) of the model input
    frozen_outside: list[str] = field(default_factory=list)  # stem/head kept out of the chain
    activation: str | None = None  # the network's activation (most common in the chain)

    @property
    def length(self) -> int:
        return len(self.convs)

    def conv(self, i: int) -> ConvSpec:
        return self.convs[i - 1]

    @property
    def breaks(self) -> list[int]:
        return [n.index for n in self.nodes if n.is_break]

    def to_dict(self) -> dict:
        return {
            "schema": CHAIN_SCHEMA,
            "chain_length": self.length,
            "input_shape": list(self.input_shape),
            "activation": self.activation,
            "frozen_outside": list(self.frozen_outside),
            "nodes": [asdict(n) for n in self.nodes],
            "convs": [asdict(c) for c in self.convs],
            "skips": [asdict(s) for s in self.skips],
        }

    def fingerprint(self) -> str:
        """A hash of the chain's structure (not its weights).

        Tables and plans carry it so that a file made for one network is refused
        for another. Module paths are left out so that the same architecture under
        a different wrapper still matches; shapes are kept because latency depends
        on them.
        """
        d = {
            "schema": CHAIN_SCHEMA,
            "input_shape": list(self.input_shape),
            "nodes": [[n.index, n.activation, list(n.shape), n.is_break] for n in self.nodes],
            "convs": [
                [
                    c.index,
                    c.in_channels,
                    c.out_channels,
                    c.kernel,
                    c.stride,
                    c.padding,
                    c.groups,
                    c.bias,
                    c.bn_path is not None,
                    c.frozen,
                    c.allow_empty,
                ]
                for c in self.convs
            ],
            "skips": [
                [s.start, s.end, s.projection is not None, s.projection_kernel, s.projection_stride]
                for s in self.skips
            ],
        }
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
