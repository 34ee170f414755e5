"""What one latency-table entry times, and how.

An entry is the option's module from its model family
(:meth:`~layermerge.families.Family.option_module`: for a CNN the merged conv, the
residual adds the option owns and its end activation, as one module), timed on
inputs of the real shapes (:func:`option_input_shapes`). This module builds the
table's rows from such measurements: the entry itself, the entry without its end
activation (``latency_noact_ms``) and the costs of dropped convs
(``dropped_ms``); :mod:`.table` writes them and predicts with them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from ..chain import Chain, repeats_activation
from ..families import TracedModel, family_of
from ..families.base import OptionInContext, owned_skips
from ..ops import make_activation
from ..plan import Plan, PlanBlock
from ..space import SearchSpace
from ..tables import format_key
from ..transform import deploy_network as _deploy_network
from .backends import Backend, BackendError
from .timing import Measurement, TimingConfig, default_flush_mb, flusher, measure

__all__ = [
    "deploy_network",
    "dropped_block",
    "option_input_shape",
    "option_input_shapes",
    "option_module",
    "weight_count",
]


def deploy_network(traced: TracedModel, plan: Plan, *, verify: bool = True) -> nn.Module:
    """The deploy network of ``plan`` as the backends time it (one input, one output);
    the identity plan gives the original network with BatchNorm folded, the fair
    baseline. Same as :func:`layermerge.transform.deploy_network` with ``one_input``."""
    return _deploy_network(traced, plan, verify=verify, one_input=True)


def option_module(traced: TracedModel, option: PlanBlock) -> nn.Module:
    """What ``option`` costs in the deploy network, with random weights (its model
    family's :meth:`~layermerge.families.Family.option_module`); an empty option,
    allowed by some families, is the identity."""
    return family_of(traced).option_module(traced, option)


def option_input_shape(chain: Chain, option: PlanBlock) -> tuple[int, ...]:
    """(C, H, W) the option's conv reads: the real shape at its start node."""
    return tuple(chain.nodes[option.start].shape)


def option_input_shapes(traced: TracedModel, option: PlanBlock) -> tuple[tuple[int, ...], ...]:
    """(C, H, W) of every input :func:`option_module` takes: the start node, then the
    start node of each residual add the option owns."""
    return family_of(traced).option_input_shapes(traced, option)


def dropped_block(chain: Chain, conv: int) -> PlanBlock:
    """The block of the layer-pruning baseline that drops conv ``conv``."""
    return PlanBlock(conv - 1, conv, kernel=1, stride=1, depthwise=False, kept_convs=())


def weight_count(module: nn.Module) -> int:
    """Weight elements of the convs ``module`` runs (merged conv and projections):
    what one call reads from memory besides its activations."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d))


def _is_empty(module: nn.Module) -> bool:
    """Whether ``module`` computes nothing (an empty option owning no add and keeping
    no activation): it costs nothing and is not timed."""
    if isinstance(module, nn.Identity):
        return True
    if isinstance(module, nn.Sequential):
        return all(_is_empty(m) for m in module)
    return False


def _parts(module: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the conv or identity, what follows the adds) of an option module."""
    if isinstance(module, OptionInContext):
        post = None if isinstance(module.post, nn.Identity) else module.post
        return module.body, post
    if isinstance(module, nn.Sequential) and len(module) == 2:
        return module[0], module[1]
    return module, None


def _row_of(
    option: PlanBlock,
    conv: nn.Module,
    act: str | None,
    shapes: Sequence[Sequence[int]],
    skips: str,
    m: Measurement | None,
    statistic: str,
    overhead_ms: float,
    layout_ms: float,
    run_id: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "start": option.start,
        "end": option.end,
        "kernel": option.kernel,
        "stride": option.stride,
        "depthwise": option.depthwise,
        "kept_convs": option.kept_convs,
        "activation": act or "",
        "input_shape": "+".join("x".join(map(str, s)) for s in shapes),
        "skips": skips,
        "run": run_id,
    }
    if isinstance(conv, nn.Conv2d):
        row.update(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            padding=conv.padding[0],
            groups=conv.groups,
        )
    if m is None:  # an option that computes nothing costs nothing
        row.update(latency_ms=0.0, runs=0, warmup_runs=0, stopped="empty")
        return row
    row.update(
        latency_ms=_entry_ms(m, statistic, overhead_ms, layout_ms),
        median_ms=m.median_ms,
        min_ms=m.min_ms,
        layout_ms=layout_ms,
        p25_ms=m.p25_ms,
        p75_ms=m.p75_ms,
        ci_rel=m.ci_rel,
        runs=m.runs,
        warmup_runs=m.warmup_runs,
        stopped=m.stopped,
        elapsed_s=round(m.elapsed_s, 4),
    )
    return row


def _measure_module(
    backend: Backend,
    module: nn.Module,
    shapes: Sequence[Sequence[int]],
    timing: TimingConfig,
    what: str,
) -> tuple[Measurement, float]:
    try:
        run, layout_ms = backend.prepare_entry(
            module, shapes, timing.statistic, before_call=flusher(timing.flush_mb)
        )
        m = measure(run, timing, backend.clock)
    except BackendError:
        raise
    except Exception as e:
        raise RuntimeError(f"measuring {what} failed: {type(e).__name__}: {e}") from e
    return m, layout_ms


def _entry_ms(m: Measurement, statistic: str, overhead_ms: float, layout_ms: float) -> float:
    return max(m.value(statistic) - overhead_ms - layout_ms, 0.0)


def _all_kept(option: PlanBlock) -> bool:
    return option.kept_convs == tuple(range(option.start + 1, option.end + 1))


def _measure_option(
    traced: TracedModel,
    backend: Backend,
    option: PlanBlock,
    timing: TimingConfig,
    overhead_ms: float,
    run_id: str,
) -> dict[str, Any]:
    """One table row: ``option`` timed in context (its owned adds and end activation
    in the same module), and, for an option that the activation-removal baseline may
    use as an inner block (all convs kept, not ending the chain), also without its end
    activation (``latency_noact_ms``)."""
    chain = traced.chain
    module = option_module(traced, option)
    shapes = option_input_shapes(traced, option)
    body, post = _parts(module)
    act = type(post).__name__.lower() if post is not None else None
    skips = ";".join(f"{sk.start}-{sk.end}" for sk in owned_skips(chain, option))
    what = f"option {format_key(option.key)} ({module})"
    m, layout_ms = None, 0.0
    if not _is_empty(module):
        m, layout_ms = _measure_module(backend, module, shapes, timing, what)
    row = _row_of(
        option, body, act, shapes, skips, m, timing.statistic, overhead_ms, layout_ms, run_id
    )
    noact: float | None = row["latency_ms"]
    if option.activation:
        bare = option_module(traced, replace(option, activation=False))
        if repr(bare) != repr(module):
            noact = None
            if _all_kept(option) and option.end < chain.length:
                m2, lay2 = _measure_module(
                    backend, bare, shapes, timing, what + " without activation"
                )
                noact = _entry_ms(m2, timing.statistic, overhead_ms, lay2)
    row["latency_noact_ms"] = noact
    row["entry_ms"] = row["latency_ms"]
    row["weights"] = weight_count(module)
    return row


def _dropped_in_context(
    traced: TracedModel, block: PlanBlock, module: nn.Module
) -> tuple[nn.Module, nn.Module]:
    """Two networks whose difference is what ``block`` (a dropped conv) costs between
    convs: ``pre -> [the block's module] -> post`` and ``pre -> post``, where ``pre``
    is a 1x1 conv followed by the activation of the node before the block (which a
    runtime fuses into the conv, as the network fuses it into the previous conv) and
    ``post`` a 1x1 conv (dense, so that a runtime lays them out as it lays out a
    network's convs). What the block's ops do to the runtime's
    layout between convs is then counted: ONNX Runtime runs a lone activation that
    follows a conv's own fused one in the plain layout, with a layout conversion on
    each side, which costs more than the activation itself."""
    chain = traced.chain
    c_in = chain.nodes[block.start].shape[0]
    c_out = chain.nodes[block.end].shape[0]
    act = chain.nodes[block.start].activation if block.start > 0 else None
    pre = [nn.Conv2d(c_in, c_in, 1)]
    if act is not None:
        pre.append(make_activation(act))
    post = nn.Conv2d(c_out, c_out, 1)
    if isinstance(module, OptionInContext):
        with_block = OptionInContext(
            nn.Sequential(*pre, module.body), module.skips, nn.Sequential(module.post, post)
        )
    else:
        with_block = nn.Sequential(*pre, module, post)
    return with_block, nn.Sequential(*pre, post)


def _measure_dropped(
    traced: TracedModel,
    backend: Backend,
    space: SearchSpace,
    timing: TimingConfig,
    tick: Callable[[], None] | None = None,
) -> dict[str, float]:
    """``dropped_ms``: for each conv the layer-pruning baseline may drop, what its
    block still costs without it (the residual adds it owns and its activation),
    timed between two cheap convs and less the same without the block
    (:func:`_dropped_in_context`). Blocks that the search space itself holds as
    empty options are rows instead; a drop that leaves only a repeat of the
    activation before it costs 0 (the deploy network omits the repeat)."""
    chain = traced.chain
    keys = {o.key for o in space.options if not o.kept_convs}
    out: dict[str, float] = {}
    for i in range(1, chain.length + 1):
        if chain.conv(i).irreducible and not chain.conv(i).allow_empty:
            continue
        block = dropped_block(chain, i)
        if block.key in keys:
            continue
        module = option_module(traced, block)
        ms = 0.0
        repeat = not owned_skips(chain, block) and repeats_activation(
            chain.nodes[i - 1].activation, chain.nodes[i].activation
        )
        if not _is_empty(module) and not repeat:
            with_block, without = _dropped_in_context(traced, block, module)
            shapes = option_input_shapes(traced, block)
            stat = timing.statistic
            a = measure(backend.prepare(with_block, shapes), timing, backend.clock)
            b = measure(backend.prepare(without, shapes[0]), timing, backend.clock)
            ms = max(a.value(stat) - b.value(stat), 0.0)
        out[str(i)] = ms
        if tick is not None:
            tick()
    return out


def _working_set_mb(traced: TracedModel) -> float:
    """What one call of the network touches, roughly: its weights plus the largest
    input and output of one of its chain's convs (float32, batch 1)."""
    weights = sum(p.numel() for p in traced.model.parameters()) * 4
    nodes = traced.chain.nodes
    io = max(
        (math.prod(nodes[i - 1].shape) + math.prod(nodes[i].shape) for i in range(1, len(nodes))),
        default=0,
    )
    return (weights + 4 * io) / 2**20


def _cache_policy(traced: TracedModel, timing: TimingConfig) -> TimingConfig:
    """Evict caches between an entry's calls only when the network does not fit in
    them. A network that fits in the core's L2 (half of the default eviction) finds
    its weights and activations there on every layer; timing its layers cold would
    count memory traffic the network never has (on the demo network: entries summing
    to 1.6x the network). An explicit ``flush_mb`` is kept as given."""
    if timing.flush_mb is not None:
        return timing
    if _working_set_mb(traced) <= default_flush_mb() / 2:
        return replace(timing, flush_mb=0.0)
    return timing
