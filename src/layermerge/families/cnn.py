"""The CNN family: any model torch.fx can trace (torchvision, timm, user models).

Tracing is :mod:`.fx_trace`, the train-time and deploy networks are
:mod:`.fx_transform`; this module binds them to the :class:`~.base.Family`
interface and says what one option costs in the deploy network.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from ..chain import Chain
from ..ops import make_activation, option_conv
from ..plan import Plan, PlanBlock
from . import fx_transform
from .base import Family, OptionInContext, context_input_shapes, owned_skips, skip_module
from .fx_trace import FxTraced, trace_fx


class CnnFamily(Family):
    """fx-traceable CNNs: the fallback family, which claims every model."""

    name = "cnn"

    def claims(self, model: nn.Module) -> bool:
        return True

    def trace(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        include_stem: bool = False,
        include_head: bool = False,
        freeze: Sequence[str] = (),
    ) -> FxTraced:
        return trace_fx(
            model,
            tuple(input_shape),
            include_stem=include_stem,
            include_head=include_head,
            freeze=tuple(freeze),
        )

    def apply(self, traced: FxTraced, plan: Plan) -> nn.Module:
        return fx_transform.apply(traced, plan)

    def merge(self, train_net: nn.Module) -> nn.Module:
        return fx_transform.merge(train_net)

    def reinit_single_conv(self, train_net: nn.Module, option: PlanBlock, chain: Chain) -> None:
        tb = train_net.get_submodule(fx_transform._module_name(option))
        for i in option.kept_convs:
            tb.convs[str(i)].reset_parameters()
            if str(i) in tb.bns:
                tb.bns[str(i)].reset_parameters()

    def count_layers(self, net: nn.Module) -> dict[str, int]:
        return fx_transform.count_layers(net)

    def option_module(self, traced: FxTraced, option: PlanBlock) -> nn.Module:
        """``option`` as the deploy network runs it: merged conv (the identity for an
        empty option), + the residual adds it owns (:func:`~.base.owned_skips`, each
        through its projection conv), + its end activation. A bare conv, or
        ``Sequential(conv, activation)``, when it owns no add."""
        chain = traced.chain
        conv = option_conv(chain, option) if option.kept_convs else nn.Identity()
        act = end_activation(traced, option)
        if getattr(act, "inplace", False) is True:
            act.inplace = False  # as in the deploy network, which runs none in place
        skips = owned_skips(chain, option)
        if skips:
            return OptionInContext(conv, [skip_module(chain, sk) for sk in skips], act)
        return conv if act is None else nn.Sequential(conv, act)

    def option_input_shapes(self, traced: FxTraced, option: PlanBlock):
        return context_input_shapes(traced.chain, option)


def end_activation(traced: FxTraced, block: PlanBlock) -> nn.Module | None:
    """The activation the deploy network applies at the end of ``block``: the end
    node's own one, or, for a linear end node of a block spanning two or more
    convs, the network's activation (as :func:`.fx_transform.apply` does)."""
    if not block.activation:
        return None
    chain = traced.chain
    info = traced.info[block.end]
    if info.act is not None or info.unit.act_in_bn is not None:
        return _activation_module(traced, chain.nodes[block.end].activation, info.act_proto)
    if block.length > 1 and chain.activation:
        return _activation_module(traced, chain.activation, None)
    return None


def _activation_module(traced: FxTraced, name: str | None, proto: nn.Module | None):
    if proto is not None:
        return copy.deepcopy(proto)
    # the network's own module (with its inplace flag, slope, ...) where there is one
    for i, info in traced.info.items():
        if info.act_proto is not None and traced.chain.nodes[i].activation == name:
            return copy.deepcopy(info.act_proto)
    return make_activation(name)


CNN = CnnFamily()
FxTraced.family = CNN
