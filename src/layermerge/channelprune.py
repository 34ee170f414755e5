"""Structured channel pruning with torch-pruning: the comparison method ``channelprune``.

LayerMerge makes a network shallower; channel pruning makes it thinner. This module
prunes the output channels of every conv (and, through torch-pruning's dependency
graph, whatever is coupled to them: BatchNorms, the next layer's inputs, the
branches of a residual add) by global L1 magnitude, in one step:

- :func:`prune_channels` returns a pruned copy of a model at a ratio of its
  channels. It is deterministic: the same weights and ratio give the same
  architecture and weights, so a fine-tuned pruned network is saved as a plain state
  dict and rebuilt by pruning the same base network again
  (:func:`load_pruned`), never as a pickled module.
- :func:`rebuild_pruned` rebuilds a pruned network from its weights alone: the
  network's architecture (any weights) is cut to the widths the weights have, each
  group of coupled layers together, and the weights are loaded. This is how a shipped
  folder loads without the base network's weights.
- :func:`find_ratio` bisects the ratio against a measured latency callback to meet
  a latency budget.

torch-pruning is optional (``pip install 'layermerge[prune]'``); it is imported
when a function here needs it, so the package imports without it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = [
    "MISSING",
    "PRUNED_SCHEMA",
    "PRUNING",
    "RatioSearch",
    "available",
    "classifier_layers",
    "count_macs",
    "count_params",
    "find_ratio",
    "layer_widths",
    "load_pruned",
    "prune_channels",
    "prune_to_widths",
    "rebuild_pruned",
    "settings",
    "tensor_shapes",
]

#: the message of a missing torch-pruning
MISSING = "channelprune needs torch-pruning: pip install 'layermerge[prune]'"

#: how :func:`prune_channels` prunes, as the pipeline records it (and keys its stages by)
PRUNING = {
    "importance": "magnitude",
    "p": 1,
    "group_reduction": "mean",
    "normalizer": "mean",
    "global_pruning": True,
    "keep_one_channel": True,
    "steps": 1,
}

#: the version of ``pruning.json`` a shipped pruned folder holds: 2 records the
#: output width of every conv and linear layer (``widths``), from which the network
#: is rebuilt without the base weights; 1 (no ``schema``) the ratio and the base
#: weights to prune again (the widths are then read off ``weights.safetensors``)
PRUNED_SCHEMA = 2

#: the ratios :func:`find_ratio` searches by default
MAX_RATIO = 0.95


def available() -> bool:
    """Whether torch-pruning is installed (without importing it)."""
    return importlib.util.find_spec("torch_pruning") is not None


def _tp():
    try:
        return importlib.import_module("torch_pruning")
    except ImportError as e:
        raise ImportError(MISSING) from e


def settings() -> dict[str, Any]:
    """:data:`PRUNING` with the torch-pruning version that prunes."""
    tp = _tp()
    try:  # the distribution's version (the module's own string may lag behind it)
        version = importlib.metadata.version("torch-pruning")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(tp, "__version__", "unknown")
    return {**PRUNING, "torch_pruning": version}


def classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose output width is the model's: the last ``nn.Linear`` (the
    classifier), else the last conv (a fully convolutional head)."""
    for kind in (nn.Linear, nn.modules.conv._ConvNd):
        layers = [m for m in model.modules() if isinstance(m, kind)]
        if layers:
            return [layers[-1]]
    return []


class _KeepStrongest:
    """The group importance of ``inner`` with each group's ``keep`` strongest channels
    made infinitely important: global ranking then never selects every channel of a
    layer (torch-pruning skips such a group whole, which would leave the widest layers
    unpruned at high ratios and make the latency non-monotone in the ratio), nor so
    many that rounding the width to a multiple of ``keep`` leaves it unpruned."""

    def __init__(self, inner: Callable, keep: int = 1) -> None:
        self.inner = inner
        self.keep = keep

    def __call__(self, group):
        imp = self.inner(group)
        if imp is None or imp.numel() == 0:
            return imp
        imp = imp.clone()
        imp[torch.topk(imp, min(self.keep, imp.numel())).indices] = float("inf")
        return imp


def _pruner_class(tp):
    # BasePruner since torch-pruning 1.5; MetaPruner is its older name
    return getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner


def prune_channels(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor,
    *,
    ignored: Iterable[str | nn.Module] | None = None,
    round_to: int | None = None,
) -> nn.Module:
    """A copy of ``model`` (in eval mode) with ``ratio`` of its prunable channels
    removed: one step of torch-pruning's pruner, global ranking of the channels by
    their group's mean L1 magnitude (normalised per group), each layer keeping at
    least its strongest channel (a ratio above what that allows prunes as much as it
    allows; with ``round_to``, at least that many). ``model`` itself is not changed.

    ``ignored``: modules of ``model`` (or their names in ``model.named_modules()``)
    whose output width must not change; default: the classifier (:func:`classifier_layers`). ``round_to``:
    keep channel counts multiples of it. ``example_input``: one batch, only traced
    (its values do not matter). Deterministic: the same weights and ratio give the
    same network."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: a fraction of the channels in [0, 1), got {ratio}")
    tp = _tp()
    net = copy.deepcopy(model).eval()  # eval: tracing must not touch BatchNorm statistics
    if ratio == 0.0:
        return net
    if ignored is None:
        keep = classifier_layers(net)
    else:
        names = {id(m): n for n, m in model.named_modules()}
        wanted = [n if isinstance(n, str) else names.get(id(n), "?") for n in ignored]
        copies = dict(net.named_modules())
        missing = [n for n in wanted if n not in copies]
        if missing:
            raise ValueError(f"ignored: not modules of the model: {missing}")
        keep = [copies[n] for n in wanted]
    param = next(net.parameters(), None)
    x = example_input.to(param.device) if param is not None else example_input
    importance = tp.importance.MagnitudeImportance(
        p=PRUNING["p"], group_reduction=PRUNING["group_reduction"], normalizer=PRUNING["normalizer"]
    )

    strongest = max(1, round_to or 1)

    def pruner(r: float):
        return _pruner_class(tp)(
            net,
            x,
            importance=_KeepStrongest(importance, strongest),
            global_pruning=PRUNING["global_pruning"],
            pruning_ratio=r,
            ignored_layers=keep,
            round_to=round_to,
            iterative_steps=PRUNING["steps"],
        )

    with _trainable(net):
        p = pruner(float(ratio))
        cap = _max_ratio(p, strongest)
        if ratio > cap:  # a larger one would select every channel of some group
            p = pruner(cap)
        with torch.no_grad():
            p.step()
    return net.eval()


def _max_ratio(pruner, keep: int = 1) -> float:
    """The largest ratio at which global ranking leaves every group its ``keep``
    strongest channels: with more, the threshold reaches the kept (infinitely
    important) channels, every group falls below it and torch-pruning prunes nothing."""
    groups = pruner.DG.get_all_groups(
        ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
    )
    kept = sum(min(keep, len(g[0].idxs)) for g in groups)
    total = pruner.initial_total_channels
    return max(0.0, (total - kept - 0.5) / total) if total else 0.0


def load_pruned(
    model: nn.Module,
    ratio: float,
    example_input: torch.Tensor,
    weights: str | Path | dict[str, torch.Tensor],
    **prune_kw: Any,
) -> nn.Module:
    """A fine-tuned pruned network back from its state dict (a dict, or a
    ``.safetensors`` / torch file): ``model`` (the base network it was pruned from,
    with its weights) pruned again at ``ratio``, then ``weights`` loaded strictly.
    :func:`rebuild_pruned` needs no base weights."""
    net = prune_channels(model, ratio, example_input, **prune_kw)
    sd = _read_state(weights)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(
            f"the weights do not fit the network pruned at ratio {ratio:g} (was it pruned "
            f"from other base weights?): {str(e).splitlines()[0]}"
        ) from None
    return net.eval()


def _read_state(weights: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a dict, a ``.safetensors`` file or a torch file (tensors only:
    ``weights_only``, nothing is unpickled)."""
    if isinstance(weights, dict):
        return weights
    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(weights))
    return torch.load(weights, map_location="cpu", weights_only=True)


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a ``.safetensors`` file, read off its header
    (the tensors are not loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _out_width(m: nn.Module) -> int | None:
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


def _out_width_of_shape(m: nn.Module, shape: tuple[int, ...]) -> int:
    """The output width the weight of ``shape`` gives the conv or linear layer ``m``
    (whose own weight may have another shape)."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):  # weight: (in, out / groups, ...)
        if m.groups == 1:
            return int(shape[1])
        if m.groups == m.in_channels == m.out_channels:  # depthwise: groups = channels
            return int(shape[0])
        return int(shape[1]) * m.groups
    return int(shape[0])  # conv: (out, in / groups, ...); linear: (out, in)


def layer_widths(model: nn.Module, state: dict[str, Any] | None = None) -> dict[str, int]:
    """The output width of every conv and linear layer of ``model``, by its name in
    ``model.named_modules()``: the layers' own, or, given ``state`` (a state dict, or
    the tensor shapes by key, e.g. :func:`tensor_shapes`), the widths its weights give
    them (layers whose weight ``state`` lacks are left out)."""
    widths: dict[str, int] = {}
    for name, m in model.named_modules():
        width = _out_width(m)
        if width is None:
            continue
        if state is not None:
            w = state.get(f"{name}.weight" if name else "weight")
            if w is None:
                continue
            width = _out_width_of_shape(m, tuple(getattr(w, "shape", w)))
        widths[name] = int(width)
    return widths


@contextlib.contextmanager
def _trainable(net: nn.Module):
    """Every parameter of ``net`` trainable and gradients on, the flags restored after:
    torch-pruning reads the layers' couplings off the autograd graph of a forward
    pass, which frozen parameters (a distillation teacher's) would hide."""
    frozen = {n for n, q in net.named_parameters() if not q.requires_grad}
    net.requires_grad_(True)
    try:
        with torch.enable_grad():  # also when called under torch.no_grad()
            yield
    finally:
        for n, q in net.named_parameters():
            q.requires_grad_(n not in frozen)


def prune_to_widths(
    model: nn.Module,
    widths: dict[str, int],
    example_input: torch.Tensor,
    *,
    source: str = "widths",
) -> nn.Module:
    """A copy of ``model`` (in eval mode) with each conv and linear layer named in
    ``widths`` cut to that many output channels, and whatever is coupled to it
    (BatchNorms, the next layers' inputs, the other branches of a residual add, a
    depthwise conv's groups) with it, through torch-pruning's dependency graph; the
    layers keep their first channels (the weights are meant to be replaced, e.g. by
    :func:`rebuild_pruned`). ``model`` itself is not changed. ``source`` names where
    the widths come from in errors (e.g. a file): a width larger than the layer's, or
    widths the couplings cannot give together (a residual add's branches cut to
    different widths), raise ``ValueError``."""
    tp = _tp()
    net = copy.deepcopy(model).eval()
    modules = dict(net.named_modules())
    unknown = sorted(n for n in widths if _out_width(modules.get(n, nn.Identity())) is None)
    if unknown:
        raise ValueError(f"{source}: not conv or linear layers of the model: {unknown[:5]}")
    for name, w in widths.items():
        if not 1 <= int(w) <= _out_width(modules[name]):
            raise ValueError(
                f"{source}: layer {name} has {w} output channels, which the model's "
                f"{_out_width(modules[name])} cannot be pruned to (is it another model, "
                "or other model_kwargs?)"
            )
    param = next(net.parameters(), None)
    x = example_input.to(param.device) if param is not None else example_input
    with _trainable(net):
        graph = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        with torch.no_grad():
            for name, w in widths.items():
                m = modules[name]
                now = _out_width(m)
                if now <= w:  # already (an earlier group cut it with its own root)
                    continue
                prune_out = graph.get_pruner_of_module(m).prune_out_channels
                graph.get_pruning_group(m, prune_out, list(range(int(w), now))).prune()
    got = layer_widths(net)
    wrong = {n: (int(w), got[n]) for n, w in widths.items() if got[n] != int(w)}
    if wrong:
        shown = ", ".join(f"{n}: {w} (got {g})" for n, (w, g) in list(wrong.items())[:5])
        raise ValueError(
            f"{source}: the model cannot be pruned to these widths together (coupled "
            f"layers differ): {shown}"
        )
    return net.eval()


def rebuild_pruned(
    model: nn.Module,
    weights: str | Path | dict[str, torch.Tensor],
    example_input: torch.Tensor,
    *,
    widths: dict[str, int] | None = None,
    source: str | None = None,
) -> nn.Module:
    """A pruned network back from its weights alone (a state dict, or a
    ``.safetensors`` / torch file): ``model`` (the unpruned architecture; its weights
    do not matter) cut to ``widths`` (default: the widths of the conv and linear
    weights in ``weights``) by :func:`prune_to_widths`, then ``weights`` loaded
    strictly. Errors name the file; ``source``: where ``widths`` come from (e.g. the
    file that records them), for the errors of widths the model cannot be cut to."""
    name = "the weights" if isinstance(weights, dict) else str(weights)
    sd = _read_state(weights)
    if widths is None:
        widths = layer_widths(model, sd)
    net = prune_to_widths(model, widths, example_input, source=source or name)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise ValueError(
            f"{name} does not fit the model pruned to these widths: "
            + ("; ".join(lines[:3]) or str(e).splitlines()[0])
        ) from None
    return net.eval()


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def count_macs(net: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of ``example_input`` (torch-pruning's
    counter)."""
    macs, _ = _tp().utils.count_ops_and_params(net, example_input)
    return int(macs)


class RatioSearch(NamedTuple):
    """What :func:`find_ratio` found: the ratio and the latency measured at it."""

    ratio: float
    measured_ms: float


def find_ratio(
    model: nn.Module,
    example_input: torch.Tensor,
    budget_ms: float,
    measure: Callable[[nn.Module], float],
    *,
    low: float = 0.0,
    high: float = MAX_RATIO,
    iterations: int = 8,
    low_ms: float | None = None,
    prune: Callable[..., nn.Module] | None = None,
    trials: list[dict[str, float]] | None = None,
) -> RatioSearch:
    """The smallest pruning ratio in [``low``, ``high``] whose network ``measure``
    (pruned network -> ms, e.g. its measured latency) puts within ``budget_ms``, by
    bisection: ``low`` when it already is, ``high`` (over the budget: check
    ``measured_ms``) when even that is not, else ``iterations`` halvings of the
    interval between a ratio over and one within the budget (8: to 1/256 of it).

    Measured latency is noisy and only roughly monotone in the ratio: each ratio is
    measured once and taken at its word, so the answer is a ratio measured within the
    budget, not a proof that every larger one is. ``low_ms``: the latency at ``low``
    when it is known (at ratio 0: the unpruned network's), instead of measuring it.
    ``prune`` (default :func:`prune_channels`) makes the network of a ratio;
    ``trials`` receives one ``{"ratio", "ms", "within"}`` per measurement, in order."""
    if not 0.0 <= low <= high < 1.0:
        raise ValueError(f"find_ratio: need 0 <= low <= high < 1, got {low}, {high}")
    prune = prune or prune_channels
    log = trials if trials is not None else []

    def at(ratio: float) -> float:
        ms = float(measure(prune(model, ratio, example_input)))
        log.append({"ratio": ratio, "ms": ms, "within": ms <= budget_ms})
        return ms

    ms = at(low) if low_ms is None else float(low_ms)
    if ms <= budget_ms:
        return RatioSearch(low, ms)
    best = at(high)
    if best > budget_ms:
        return RatioSearch(high, best)
    lo, hi = low, high  # invariant: lo measured over the budget, hi within it
    for _ in range(iterations):
        mid = (lo + hi) / 2
        ms = at(mid)
        if ms <= budget_ms:
            hi, best = mid, ms
        else:
            lo = mid
    return RatioSearch(hi, best)
