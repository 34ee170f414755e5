"""Apply a plan to an fx-traced CNN (train-time network) and merge it (deploy network).

``apply`` rewrites the traced fx graph: every block's span of convs, BatchNorms,
inner activations and inner skips is replaced by one :class:`TrainBlock` that
runs the kept convs without activations between them, with all padding moved to
the block input so that the span is exactly one convolution. ``merge`` replaces
each TrainBlock by that convolution (BatchNorm folded, skips folded into the
kernel) and folds the remaining conv+BN pairs; :func:`layermerge.transform.merge`
verifies the result against the train-time network on a random input — every
time, not only in tests.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..chain import repeats_activation
from ..ops import ACTIVATION_MODULES, Affine, fold_bn, make_activation
from ..plan import Plan, PlanBlock
from ..space import merged_geometry
from .base import MergeVerificationError, copy_marks, mark
from .fx_trace import FxTraced, _activation_of


def _crop(t: torch.Tensor, c: int) -> torch.Tensor:
    if c == 0:
        return t
    return t[..., c : t.shape[-2] - c, c : t.shape[-1] - c]


@dataclass(frozen=True)
class _Step:
    conv: int  # chain index
    kept: bool
    margin: int  # margin of the tensor after this conv, in its own resolution


@dataclass(frozen=True)
class _InnerSkip:
    start: int
    end: int
    crop: int  # crop applied to the saved source tensor
    projection: str | None  # key into TrainBlock.projs


class TrainBlock(nn.Module):
    """The train-time form of one block: kept convs (+BN), no activations between them.

    The block input is zero-padded once by the sum of the kept convs' paddings and
    every conv then runs unpadded, so the intermediate maps are larger than in the
    original network by the padding still to be consumed (the "margin"). That is
    what makes the span exactly one convolution of the padded input. Skips inside
    the block crop their source to the margin of their target; the source of a skip
    from the block input is the padded input itself, i.e. the input zero-padded.
    """

    def __init__(
        self, start: int, end: int, pad: int, steps, inner_skips, convs, bns, projs, proj_bns
    ):
        super().__init__()
        self.start, self.end, self.pad = start, end, pad
        self.steps: tuple[_Step, ...] = tuple(steps)
        self.inner_skips: tuple[_InnerSkip, ...] = tuple(inner_skips)
        self.convs = nn.ModuleDict(convs)
        self.bns = nn.ModuleDict(bns)
        self.projs = nn.ModuleDict(projs)
        self.proj_bns = nn.ModuleDict(proj_bns)
        self._sources = {sk.start for sk in self.inner_skips}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pad(x, [self.pad] * 4) if self.pad else x
        saved = {self.start: h} if self.start in self._sources else {}
        for st in self.steps:
            if st.kept:
                k = str(st.conv)
                h = self.convs[k](h)
                if k in self.bns:
                    h = self.bns[k](h)
            for sk in self.inner_skips:
                if sk.end == st.conv:
                    src = _crop(saved[sk.start], sk.crop)
                    if sk.projection is not None:
                        src = self.projs[sk.projection](src)
                        if sk.projection in self.proj_bns:
                            src = self.proj_bns[sk.projection](src)
                    h = h + src
            if st.conv in self._sources:
                saved[st.conv] = h
        return h

    def extra_repr(self) -> str:
        kept = [s.conv for s in self.steps if s.kept]
        return f"span=({self.start}, {self.end}], kept={kept}, pad={self.pad}"


def _conv_nopad(conv: nn.Conv2d) -> nn.Conv2d:
    c = copy.deepcopy(conv)
    c.padding = (0, 0)
    c._reversed_padding_repeated_twice = [0, 0, 0, 0]
    return c


def _plain_bn(bn: nn.Module) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with the parameters and statistics of ``bn`` (which may be
    a subclass that also applies an activation)."""
    if type(bn) is nn.BatchNorm2d:
        return copy.deepcopy(bn)
    p = next(bn.parameters(), bn.running_mean)
    out = nn.BatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        device=p.device,
        dtype=p.dtype,
    )
    out.load_state_dict({k: v for k, v in bn.state_dict().items() if k in out.state_dict()})
    return out


def build_train_block(traced: FxTraced, block: PlanBlock) -> TrainBlock:
    chain = traced.chain
    s, e = block.start, block.end
    kept = set(block.kept_convs)
    _, _, pad = merged_geometry(chain, block.kept_convs)
    # margins after each conv: m_j = (m_{j-1} - p_j) / s_j for kept convs
    steps, margins, m = [], {s: pad}, pad
    for j in range(s + 1, e + 1):
        c = chain.conv(j)
        if j in kept:
            assert (m - c.padding) % c.stride == 0 and m >= c.padding, (s, e, j)
            m = (m - c.padding) // c.stride
        steps.append(_Step(conv=j, kept=j in kept, margin=m))
        margins[j] = m
    assert m == 0, (s, e, m)
    convs, bns, projs, proj_bns, inner = {}, {}, {}, {}, []
    for j in sorted(kept):
        spec = chain.conv(j)
        convs[str(j)] = _conv_nopad(traced.module(spec.path))
        if spec.bn_path:
            bns[str(j)] = _plain_bn(traced.module(spec.bn_path))
    for sk in chain.skips:
        if not (s <= sk.start and sk.end <= e):
            continue
        if sk.projection is None:
            need = margins[sk.end]
            key = None
        else:
            need = margins[sk.end] * sk.projection_stride + sk.projection_padding
            key = str(sk.start) + "_" + str(sk.end)
            projs[key] = _conv_nopad(traced.module(sk.projection))
            if sk.projection_bn:
                proj_bns[key] = _plain_bn(traced.module(sk.projection_bn))
        crop = margins[sk.start] - need
        if crop < 0:
            raise ValueError(
                f"block ({s}, {e}) keeps convs {sorted(kept)}, which leave too little padding "
                f"for the skip ({sk.start}, {sk.end}); keep more convs in this block"
            )
        inner.append(_InnerSkip(start=sk.start, end=sk.end, crop=crop, projection=key))
    return TrainBlock(s, e, pad, steps, inner, convs, bns, projs, proj_bns)


def _module_name(block: PlanBlock) -> str:
    return f"lm_block_{block.start}_{block.end}"


def apply(traced: FxTraced, plan: Plan) -> fx.GraphModule:
    """The train-time network of ``plan``: an ``nn.Module`` holding the original
    weights that trains with autograd and is exactly equal to the merged network."""
    gm = copy.deepcopy(traced.gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    chain = traced.chain

    def fx_node(n: fx.Node | None) -> fx.Node | None:
        return None if n is None else nodes[n.name]

    # Last block first: a block's input node belongs to the block before it, which is
    # then still the original node; replacing it later redirects every use at once.
    for block in reversed(plan.blocks):
        s, e = block.start, block.end
        tb = build_train_block(traced, block)
        name = _module_name(block)
        gm.add_submodule(name, tb)
        inner = {(sk.start, sk.end) for sk in chain.skips if s <= sk.start and sk.end <= e}
        end_info = traced.info[e]
        # The TrainBlock returns node e's pre-activation including the skips inside it.
        if end_info.add is not None and any(sk[1] == e for sk in inner):
            replaced = fx_node(end_info.add)
        else:
            replaced = fx_node(end_info.unit.post)
        # Everything the block computes, erased below once nothing uses it.
        erase: list[fx.Node] = []
        for j in range(s + 1, e + 1):
            info = traced.info[j]
            erase += [fx_node(info.unit.conv), fx_node(info.unit.bn)]
            if info.add is not None and any(sk[1] == j for sk in inner):
                erase.append(fx_node(info.add))
            if j < e:
                erase.append(fx_node(info.act))
        for (p, q), pu in traced.projections.items():
            if (p, q) in inner:
                erase += [fx_node(pu.conv), fx_node(pu.bn)]
        erase = [n for n in erase if n is not None]

        with graph.inserting_after(replaced):
            new = graph.call_module(name, (fx_node(traced.inputs[s + 1]),))
        replaced.replace_all_uses_with(new)
        # The activation at the block end.
        outer_add = fx_node(end_info.add) if replaced is not fx_node(end_info.add) else None
        pre = outer_add if outer_add is not None else new
        act = fx_node(end_info.act)
        if act is not None and not block.activation:
            act.replace_all_uses_with(act.args[0])
            erase.append(act)
        needs_act = (
            block.activation
            and act is None
            and (end_info.unit.act_in_bn is not None or (block.length > 1 and chain.activation))
        )
        if needs_act:
            if end_info.unit.act_in_bn is not None:
                proto = copy.deepcopy(end_info.act_proto)
            else:
                proto = _network_activation(traced)
            act_name = f"{name}_act"
            gm.add_submodule(act_name, proto)
            users = list(pre.users)
            with graph.inserting_after(pre):
                act_node = graph.call_module(act_name, (pre,))
            for u in users:
                u.replace_input_with(pre, act_node)
        for n in sorted(erase, key=_topo_index(graph), reverse=True):
            if n.users:
                raise RuntimeError(
                    f"internal error applying block ({s}, {e}): graph node {n.name} is still "
                    f"used by {[u.name for u in n.users]}"
                )
            graph.erase_node(n)
    _disable_inplace(gm)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    mark(gm, "cnn", plan, chain.input_shape)
    return gm


def _disable_inplace(gm: fx.GraphModule) -> None:
    """Make every in-place activation out-of-place.

    A pruned span (identity block) returns its input tensor itself, and a block's
    output may be read by a skip as well; an in-place activation after it would then
    overwrite a tensor that is still needed (and break autograd)."""
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.kwargs.get("inplace") is True:
            n.kwargs = {**n.kwargs, "inplace": False}
        elif n.op == "call_function" and n.target in (torch.relu_, F.relu_):
            n.target = torch.relu
        elif n.op == "call_method" and n.target == "relu_":
            n.target = "relu"


def _topo_index(graph: fx.Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _network_activation(traced: FxTraced) -> nn.Module:
    for i, info in traced.info.items():
        if traced.chain.nodes[i].activation == traced.chain.activation and info.act_proto:
            return copy.deepcopy(info.act_proto)
    return make_activation(traced.chain.activation)


# --------------------------------------------------------------------------- merging


def merge_block(tb: TrainBlock, in_channels: int, block: PlanBlock) -> nn.Module:
    """The single conv that a TrainBlock computes (or Identity for an empty block)."""
    ref = next(iter(tb.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None else torch.float32
    kept = [s.conv for s in tb.steps if s.kept]
    if not kept and not tb.inner_skips:
        return nn.Identity()
    if len(kept) == 1 and not tb.inner_skips:
        # One conv: fold its BN and keep its own groups (grouped convs stay grouped).
        k = str(kept[0])
        src = tb.convs[k]
        w, b = fold_bn(src, tb.bns[k] if k in tb.bns else None)
        conv = nn.Conv2d(
            src.in_channels,
            src.out_channels,
            src.kernel_size,
            src.stride,
            tb.pad,
            groups=src.groups,
            bias=True,
            device=device,
            dtype=dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w.to(dtype))
            conv.bias.copy_(b.to(dtype))
        return conv
    cur = Affine.identity(in_channels, device)
    saved = {tb.start: (cur, tb.pad)}
    for st in tb.steps:
        if st.kept:
            k = str(st.conv)
            conv = tb.convs[k]
            w, b = fold_bn(conv, tb.bns[k] if k in tb.bns else None)
            cur = cur.then_conv(w, b, conv.stride[0], conv.groups)
        for sk in tb.inner_skips:
            if sk.end == st.conv:
                src, _ = saved[sk.start]
                src = src.shifted(sk.crop * src.stride)
                if sk.projection is not None:
                    pc = tb.projs[sk.projection]
                    pbn = tb.proj_bns[sk.projection] if sk.projection in tb.proj_bns else None
                    w, b = fold_bn(pc, pbn)
                    src = src.then_conv(w, b, pc.stride[0], pc.groups)
                cur = cur.plus(src)
        if st.conv in tb._sources:
            saved[st.conv] = (cur, st.margin)
    W, bvec = cur.dense(), cur.bias
    if W.shape[-1] != block.kernel:
        # skips can only add zero taps beyond the merged kernel; anything else is a bug
        extra = W[..., block.kernel :, :].abs().max().item() if W.shape[-1] > block.kernel else 0
        if W.shape[-1] < block.kernel or extra != 0:
            raise MergeVerificationError(
                f"block ({block.start}, {block.end}): merged kernel {W.shape[-1]} != {block.kernel}"
            )
        W = W[..., : block.kernel, : block.kernel]
    c_out = W.shape[0]
    depthwise = block.depthwise and c_out == in_channels
    if depthwise:
        off = W.clone()
        idx = torch.arange(c_out, device=W.device)
        off[idx, idx] = 0
        if off.abs().max().item() != 0:
            depthwise = False
        else:
            W = W[idx, idx][:, None]
    conv = nn.Conv2d(
        in_channels,
        c_out,
        block.kernel,
        stride=cur.stride,
        padding=tb.pad,
        groups=in_channels if depthwise else 1,
        bias=True,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(W.to(dtype))
        conv.bias.copy_(bvec.to(dtype))
    return conv


def merge(train_net: fx.GraphModule) -> fx.GraphModule:
    """The deploy network of a train-time network made by :func:`apply` (unverified):
    each block becomes one ``nn.Conv2d`` (depthwise when every kept conv was) and
    BatchNorm is folded everywhere."""
    from torch.fx.experimental.optimization import fuse

    was_training = train_net.training
    train_net.eval()
    plan = Plan.from_dict(train_net.layermerge_plan)
    deploy = copy.deepcopy(train_net)
    deploy.eval()
    for block in plan.blocks:
        name = _module_name(block)
        tb = deploy.get_submodule(name)
        in_channels = _block_in_channels(deploy, name)
        with torch.no_grad():
            merged = merge_block(tb, in_channels, block)
        setattr(deploy, name, merged)
    deploy = fuse(deploy, inplace=True, no_trace=True)
    drop_repeated_activations(deploy)
    deploy.graph.lint()
    deploy.recompile()
    copy_marks(train_net, deploy)
    train_net.train(was_training)
    return deploy


def drop_repeated_activations(gm: fx.GraphModule) -> int:
    """Remove every activation applied to the output of the same idempotent
    activation (``relu6(relu6(x)) == relu6(x)``), looking through identities: what a
    dropped conv whose node adds nothing leaves behind. Exact; a runtime would
    otherwise run the repeat on its own (ONNX Runtime: with a layout conversion on
    each side). Returns how many were removed."""
    modules = dict(gm.named_modules())
    removed = 0
    for n in list(gm.graph.nodes):
        act = _activation_of(n, modules)
        if act is None or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        src = n.args[0]
        while (
            src.op == "call_module"
            and isinstance(modules.get(src.target), nn.Identity)
            and len(src.args) == 1
            and isinstance(src.args[0], fx.Node)
        ):
            src = src.args[0]
        before = _activation_of(src, modules)
        if before is not None and repeats_activation(before[0], act[0]):
            n.replace_all_uses_with(n.args[0])
            gm.graph.erase_node(n)
            removed += 1
    if removed:
        gm.delete_all_unused_submodules()
    return removed


def _block_in_channels(gm: fx.GraphModule, name: str) -> int:
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target == name:
            return (
                int(n.args[0].meta["tensor_meta"].shape[1])
                if "tensor_meta" in n.args[0].meta
                else _infer_channels(gm, n)
            )
    raise KeyError(name)


def _infer_channels(gm: fx.GraphModule, node: fx.Node) -> int:
    tb = gm.get_submodule(node.target)
    for k in sorted(tb.convs, key=int):
        return tb.convs[k].in_channels
    for k in tb.projs:
        return tb.projs[k].in_channels
    raise ValueError(f"cannot tell the input channels of {node.target}")


def count_layers(net: nn.Module) -> dict[str, int]:
    """Number of conv modules and activation calls in an fx-traced network's graph."""
    gm = net if isinstance(net, fx.GraphModule) else fx.symbolic_trace(net)
    modules = dict(gm.named_modules())
    convs = acts = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d):
            convs += 1
        elif _activation_of(n, modules) is not None:
            acts += 1
        elif n.op == "call_module" and type(getattr(modules[n.target], "act", None)) in (
            ACTIVATION_MODULES
        ):
            acts += 1  # a BatchNorm that applies its activation itself (timm)
        elif n.op == "call_module" and isinstance(modules[n.target], TrainBlock):
            convs += sum(1 for s in modules[n.target].steps if s.kept)
    return {"convs": convs, "activations": acts}
