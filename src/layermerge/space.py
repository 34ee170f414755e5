"""The search space: valid blocks and their options.

A block is a span ``(s, e]`` of the chain. It is valid when no break lies
strictly inside it and every skip is inside it, contains it, or is disjoint
from it. Its options come from choosing, for each group of convs with the same
(kernel, depthwise), how many to keep (at least the irreducible ones); options
are distinct by the merged conv they produce: (kernel, stride, depthwise).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .chain import Chain
from .plan import DROP_METHODS, Plan, PlanBlock, PlanError, check_plan_for_chain

Option = PlanBlock  # an option is exactly a block of a plan: span + merged conv + kept convs


def block_is_valid(chain: Chain, s: int, e: int) -> bool:
    if not 0 <= s < e <= chain.length:
        return False
    if any(s < b < e for b in chain.breaks):
        return False
    for sk in chain.skips:
        inside = sk.start <= s and e <= sk.end
        contains = s <= sk.start and sk.end <= e
        disjoint = e <= sk.start or sk.end <= s
        if not (inside or contains or disjoint):
            return False
    return True


def merged_geometry(chain: Chain, kept: Iterable[int]) -> tuple[int, int, int]:
    """(kernel, stride, total padding) of the conv that ``kept`` convs merge into.

    Later kernels are dilated by the stride accumulated before them; the stride
    rule keeps every conv after a strided one at 1x1, so in practice this is
    ``1 + sum(k_i - 1)``.
    """
    kernel, stride, pad = 1, 1, 0
    for i in kept:
        c = chain.conv(i)
        kernel += (c.kernel - 1) * stride
        pad += c.padding * stride
        stride *= c.stride
    return kernel, stride, pad


@dataclass
class SearchSpace:
    """Valid blocks of a chain and the options of each block."""

    chain: Chain
    options: list[Option]  # sorted by (start, end, kernel, stride, depthwise)

    @property
    def fingerprint(self) -> str:
        return self.chain.fingerprint()

    @property
    def blocks(self) -> list[tuple[int, int]]:
        return sorted({(o.start, o.end) for o in self.options})

    def options_of(self, s: int, e: int) -> list[Option]:
        return [o for o in self.options if o.start == s and o.end == e]

    def option(self, key: tuple[int, int, int, int, bool]) -> Option:
        for o in self.options:
            if o.key == key:
                return o
        raise KeyError(key)

    # -- plans -------------------------------------------------------------------
    def plan(self, blocks: Iterable[Option], method: str = "layermerge", **meta) -> Plan:
        return Plan(
            model_fingerprint=self.fingerprint,
            chain_length=self.chain.length,
            blocks=list(blocks),
            method=method,
            meta=dict(meta),
        )

    def identity_plan(self) -> Plan:
        """Nothing compressed: every conv its own block, kept, every activation kept
        (not the empty option a family may allow for a droppable conv)."""
        return self.plan([self.kept_conv_block(i) for i in range(1, self.chain.length + 1)])

    def kept_conv_block(self, i: int) -> PlanBlock:
        """Conv ``i`` alone in its block and kept, as in the unmodified network."""
        return next(o for o in self.options_of(i - 1, i) if o.kept_convs == (i,))

    def deepest_plan(self) -> Plan:
        """Every block as long as the rules allow, keeping every conv.

        Greedy from the left: the longest valid block at each position, with the
        option that keeps all of its convs.
        """
        blocks, s, L = [], 0, self.chain.length
        while s < L:
            e = max(e for (a, e) in self.blocks if a == s)
            opts = self.options_of(s, e)
            blocks.append(max(opts, key=lambda o: (len(o.kept_convs), o.kernel)))
            s = e
        return self.plan(blocks)

    def count_plans(self) -> list[int]:
        """Number of distinct plans of the prefix 0..e, for every e."""
        L = self.chain.length
        n = [0] * (L + 1)
        n[0] = 1
        per_end: dict[int, list[tuple[int, int]]] = {}
        for s, e in self.blocks:
            per_end.setdefault(e, []).append((s, len(self.options_of(s, e))))
        for e in range(1, L + 1):
            n[e] = sum(n[s] * k for s, k in per_end.get(e, []))
        return n

    def random_plan(self, rng: random.Random | int | None = None) -> Plan:
        """A plan drawn uniformly from all valid (partition, options) combinations."""
        rng = rng if isinstance(rng, random.Random) else random.Random(rng)
        n = self.count_plans()
        by_end: dict[int, list[Option]] = {}
        for o in self.options:
            by_end.setdefault(o.end, []).append(o)
        e, blocks = self.chain.length, []
        while e > 0:
            r = rng.randrange(n[e])
            for o in by_end[e]:
                if r < n[o.start]:
                    blocks.append(o)
                    e = o.start
                    break
                r -= n[o.start]
        return self.plan(blocks, method="random")

    def check_plan(self, plan: Plan, *, allow_identity: bool | None = None) -> None:
        """Raise PlanError unless every block of ``plan`` is a valid block of this space
        with one of its options (or, for the layer-pruning baseline and LayerMerge with
        drops, an identity block over reducible convs)."""
        check_plan_for_chain(plan, self.fingerprint, self.chain.length)
        if allow_identity is None:
            allow_identity = plan.method in DROP_METHODS
        for b in plan.blocks:
            if not block_is_valid(self.chain, b.start, b.end):
                raise PlanError(f"block ({b.start}, {b.end}) is not a valid block of this chain")
            if not b.kept_convs:
                ok = all(
                    not self.chain.conv(i).irreducible or self.chain.conv(i).allow_empty
                    for i in range(b.start + 1, b.end + 1)
                )
                allowed = allow_identity or all(
                    self.chain.conv(i).allow_empty for i in range(b.start + 1, b.end + 1)
                )
                if not (ok and allowed):
                    raise PlanError(
                        f"block ({b.start}, {b.end}) keeps no conv, which this model and "
                        f"method ({plan.method}) do not allow"
                    )
                continue
            for i in range(b.start + 1, b.end + 1):
                if self.chain.conv(i).irreducible and i not in b.kept_convs:
                    raise PlanError(
                        f"block ({b.start}, {b.end}) prunes conv {i}, which is irreducible"
                    )
            k, st, _ = merged_geometry(self.chain, b.kept_convs)
            dw = all(self.chain.conv(i).depthwise for i in b.kept_convs)
            if (k, st, dw) != (b.kernel, b.stride, b.depthwise):
                raise PlanError(
                    f"block ({b.start}, {b.end}) says kernel={b.kernel}, stride={b.stride}, "
                    f"depthwise={b.depthwise}, but its kept convs {list(b.kept_convs)} merge "
                    f"into kernel={k}, stride={st}, depthwise={dw}"
                )

    # -- files ---------------------------------------------------------------------
    def option_rows(self) -> list[dict]:
        return [
            {
                "start": o.start,
                "end": o.end,
                "kernel": o.kernel,
                "stride": o.stride,
                "depthwise": o.depthwise,
                "kept_convs": o.kept_convs,
            }
            for o in self.options
        ]

    def table_meta(self) -> dict:
        return {
            "model_fingerprint": self.fingerprint,
            "chain_length": self.chain.length,
            "input_shape": list(self.chain.input_shape),
        }

    def write_options_csv(self, path: str | Path, **meta) -> Path:
        """The options as a table; ``meta`` adds to its sidecar (e.g. ``init_seed``,
        the seed of the untrained weights the kept convs were chosen on)."""
        from .tables import write_table

        return write_table(path, "options", self.option_rows(), {**meta, **self.table_meta()})

    def summary(self) -> dict:
        return {
            "chain_length": self.chain.length,
            "blocks": len(self.blocks),
            "options": len(self.options),
            "breaks": self.chain.breaks,
            "skips": len(self.chain.skips),
        }


def build_space(chain: Chain, weights: dict[int, torch.Tensor] | None = None) -> SearchSpace:
    """Enumerate the valid blocks and options of ``chain``.

    ``weights`` maps conv index -> its weight tensor; among the subsets of convs
    with the chosen counts that keep every irreducible conv, the one with the
    largest total L1 norm is kept (the reference's rule). Without weights the
    earliest convs are kept. The rule is meant for trained weights; the counts,
    and so each option's merged kernel, stride and depthwise flag, do not depend
    on the weights, only which convs of a group are kept does.
    """
    norms = {i: float(w.detach().abs().sum()) for i, w in (weights or {}).items()}
    options: list[Option] = []
    L = chain.length
    for s in range(L):
        for e in range(s + 1, L + 1):
            if not block_is_valid(chain, s, e):
                continue
            options.extend(_block_options(chain, s, e, norms))
    options.sort(key=lambda o: o.key)
    return SearchSpace(chain=chain, options=options)


def _block_options(chain: Chain, s: int, e: int, norms: dict[int, float]) -> list[Option]:
    convs = [chain.conv(i) for i in range(s + 1, e + 1)]
    groups: dict[tuple[int, bool], list] = {}
    for c in convs:
        groups.setdefault((c.kernel, c.depthwise), []).append(c)
    keys = sorted(groups)
    ranges = []
    for k in keys:
        g = groups[k]
        r = sum(1 for c in g if c.irreducible)
        ranges.append(range(r, len(g) + 1))
    allow_empty = all(c.allow_empty for c in convs)
    best: dict[tuple[int, int, bool], tuple[int, tuple[int, ...]]] = {}
    for counts in itertools.product(*ranges):
        if sum(counts) == 0 and not allow_empty:
            continue
        kept: list[int] = []
        for k, n in zip(keys, counts):
            g = groups[k]
            must = [c.index for c in g if c.irreducible]
            rest = sorted(
                (c.index for c in g if not c.irreducible),
                key=lambda i: (-norms.get(i, 0.0), i),
            )
            kept.extend(must + rest[: n - len(must)])
        kept.sort()
        kernel, stride, _ = merged_geometry(chain, kept)
        dw = bool(kept) and all(chain.conv(i).depthwise for i in kept)
        key = (kernel, stride, dw)
        # Several count vectors can give the same merged conv (1x1 convs add no
        # kernel size); keep the one that prunes least, which changes the network least.
        cand = (len(kept), tuple(kept))
        if key not in best or cand[0] > best[key][0]:
            best[key] = cand
    return [
        Option(start=s, end=e, kernel=k, stride=st, depthwise=dw, kept_convs=kept)
        for (k, st, dw), (_, kept) in sorted(best.items())
    ]
