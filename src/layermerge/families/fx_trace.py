"""Trace a CNN into LayerMerge's chain with torch.fx.

The chain is derived from the model's torch.fx graph, not from per-architecture
tables: every ``nn.Conv2d`` node is a *conv unit* (the conv, the BatchNorm that
follows it), residual adds are recognised by their operands, and everything
else on the main path (pooling, squeeze-excitation, attention, concatenation,
per-sample norms, ...) makes the node before it a break. What the tracer cannot
represent becomes a break with a reason, and a model that torch.fx cannot trace
gets a :class:`TraceError` naming the module that failed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
import sys
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..chain import Chain, ConvSpec, Node, Skip
from ..ops import ACTIVATION_MODULES, make_activation
from .base import TracedModel, TraceError

_ACT_FUNCTIONS: dict[object, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu_: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
    F.leaky_relu: "leaky_relu",
    F.mish: "mish",
    F.elu: "elu",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


@dataclass(eq=False)
class ConvUnit:
    """A conv node and the BatchNorm node folded into it (fx node names)."""

    conv: fx.Node
    bn: fx.Node | None = None
    act_in_bn: str | None = None  # a BatchNorm subclass that applies an activation itself

    @property
    def post(self) -> fx.Node:
        return self.bn if self.bn is not None else self.conv

    @property
    def input(self) -> fx.Node:
        return self.conv.args[0]


@dataclass
class FxNodeInfo:
    """Where chain node ``i`` lives in the fx graph."""

    unit: ConvUnit
    add: fx.Node | None = None  # residual add at this node (pre-activation)
    act: fx.Node | None = None  # separate activation node
    act_proto: nn.Module | None = None  # the activation module (for re-insertion)
    out: fx.Node | None = None  # node's tensor as produced by conv i (post-activation)


@dataclass(eq=False)
class FxTraced(TracedModel):
    """A CNN's fx graph (``model``, also ``gm``) with its chain and the fx locations of
    the chain."""

    info: dict[int, FxNodeInfo] = field(default_factory=dict)  # chain node (1..L) -> fx
    inputs: dict[int, fx.Node] = field(default_factory=dict)  # conv i -> the fx node it reads
    projections: dict[tuple[int, int], ConvUnit] = field(default_factory=dict)

    @property
    def gm(self) -> fx.GraphModule:
        return self.model


class _Tracer(fx.Tracer):
    """fx tracer that keeps BatchNorm subclasses (e.g. timm's BatchNormAct2d) as leaves
    and remembers which module was being traced when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_path: str | None = None
        self.failed_type: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.BatchNorm2d):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_path is None:
                self.failed_path = self.path_of_module(m) or "<root>"
                self.failed_type = type(m).__name__
            raise


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:
        where = (
            f"module '{tracer.failed_path}' ({tracer.failed_type})"
            if tracer.failed_path
            else f"the forward of {type(model).__name__}"
        )
        raise TraceError(
            f"torch.fx could not trace {where}: {type(e).__name__}: {e}. LayerMerge needs a "
            "traceable graph: remove data-dependent Python control flow from that module's "
            "forward, or wrap it in a module that torch.fx can trace."
        ) from e
    # nn.Identity placeholders (timm's disabled drop-path, anti-aliasing, ...) are
    # no-ops; dropping them keeps conv -> BN -> add -> activation patterns adjacent.
    # Stochastic depth and dropout traced in eval mode are no-ops in the graph too.
    for node in list(graph.nodes):
        if _is_noop(node, tracer.root):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.delete_all_unused_submodules()
    return gm


def _is_noop(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.Identity
    if node.op != "call_function" or not node.args:
        return False
    # position of the ``training`` argument of eval-mode no-ops, by function name
    index = {"stochastic_depth": 3, "dropout": 2, "dropout2d": 2, "drop_path": 2}
    pos = index.get(getattr(node.target, "__name__", ""))
    if pos is not None:
        training = node.kwargs.get("training", node.args[pos] if len(node.args) > pos else True)
        return training is False
    return False


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    if node.op == "call_module":
        m = modules[node.target]
        for cls, name in ACTIVATION_MODULES.items():
            if type(m) is cls:
                proto = copy.deepcopy(m)
                if hasattr(proto, "inplace"):
                    proto.inplace = False
                return name, proto
    elif node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        name = _ACT_FUNCTIONS[node.target]
        proto = make_activation(name)
        if name == "leaky_relu":
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            proto = nn.LeakyReLU(slope)
        elif name == "gelu" and node.kwargs.get("approximate", "none") != "none":
            proto = nn.GELU(approximate=node.kwargs["approximate"])
        return name, proto
    elif node.op == "call_method" and node.target in _ACT_METHODS:
        name = _ACT_METHODS[node.target]
        return name, make_activation(name)
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        ok = len(node.args) == 2 and not node.kwargs
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        ok = len(node.args) == 2 and not node.kwargs
    else:
        return False
    return ok and all(isinstance(a, fx.Node) for a in node.args)


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward


def _conv_support(m: nn.Conv2d) -> str | None:
    """Why a conv cannot take part in merging, or None."""
    if m.dilation != (1, 1):
        return f"dilation {m.dilation}"
    if m.kernel_size[0] != m.kernel_size[1]:
        return f"non-square kernel {m.kernel_size}"
    if m.stride[0] != m.stride[1]:
        return f"non-square stride {m.stride}"
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return None
        return f"string padding {m.padding!r}"
    if m.padding[0] != m.padding[1]:
        return f"asymmetric padding {m.padding}"
    if m.padding_mode != "zeros":
        return f"padding_mode {m.padding_mode!r}"
    return None


def _padding(m: nn.Conv2d) -> int:
    return 0 if isinstance(m.padding, str) else int(m.padding[0])


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
            return m.output_size in (1, (1, 1))
        # timm's SelectAdaptivePool2d and similar wrappers
        return "pool" in type(m).__name__.lower() and "adaptive" in type(m).__name__.lower()
    if node.op == "call_function" and node.target in (
        F.adaptive_avg_pool2d,
        F.adaptive_max_pool2d,
    ):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if node.op == "call_method" and node.target in ("mean", "amax"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return tuple(dims) in ((2, 3), (-2, -1)) if isinstance(dims, list | tuple) else False
    return False


def _after_global_pool(
    node: fx.Node, modules: dict[str, nn.Module], excluded: dict[fx.Node, str]
) -> bool:
    """Whether ``node`` is a global pooling output, seen through activations, BatchNorms
    and convs that are themselves on pooled maps (squeeze-excitation's second conv)."""
    for _ in range(6):
        if _is_global_pool(node, modules):
            return True
        if node in excluded:
            node = node.args[0]
            continue
        if _activation_of(node, modules) is not None or (
            node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d)
        ):
            node = node.args[0]
            continue
        return False
    return False


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise TraceError(f"no tensor shape recorded for graph node {node.name!r}")
    return tuple(int(s) for s in meta.shape)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _common_prefix(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    out = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _conv_depth(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, int]:
    """Longest number of convs on any path from the input to each graph node."""
    depth: dict[fx.Node, int] = {}
    for n in graph.nodes:
        d = max((depth[a] for a in n.all_input_nodes), default=0)
        if n.op == "call_module" and isinstance(modules.get(n.target), nn.Conv2d):
            d += 1
        depth[n] = d
    return depth


def trace_fx(
    model: nn.Module,
    input_shape: tuple[int, ...] = (3, 224, 224),
    *,
    include_stem: bool = False,
    include_head: bool = False,
    freeze: list[str] | tuple[str, ...] = (),
) -> FxTraced:
    """Trace ``model`` (in eval mode) with torch.fx into an :class:`FxTraced`.

    ``input_shape`` is (C, H, W) of one example; shapes at every node come from
    running it through the graph. The stem (first conv) and a final 1x1 head conv
    feeding global pooling stay outside the chain unless ``include_stem`` /
    ``include_head``; convs named in ``freeze`` are irreducible.
    """
    model = model.eval()
    gm = symbolic_trace(model)
    modules = dict(gm.named_modules())
    freeze = set(freeze)
    unknown = freeze - set(modules)
    if unknown:
        raise TraceError(f"--freeze names modules that do not exist: {sorted(unknown)}")
    not_conv = sorted(f for f in freeze if not isinstance(modules[f], nn.Conv2d))
    if not_conv:
        orig = dict(model.named_modules())
        kinds = ", ".join(f"{f} is a {type(orig.get(f, modules[f])).__name__}" for f in not_conv)
        raise TraceError(f"--freeze names modules that are not a Conv2d ({kinds}): name convs")

    example = torch.zeros(1, *input_shape, dtype=_param_dtype(model))
    printed = io.StringIO()  # ShapeProp prints the traceback of a failing node itself
    try:
        with torch.no_grad(), contextlib.redirect_stderr(printed):
            ShapeProp(gm).propagate(example)
    except Exception as e:
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [""])[0]
        raise TraceError(
            f"the model does not run on an input of shape {tuple(example.shape)}: "
            f"{type(cause).__name__}: {first}. Check --input-shape (C,H,W of one input)."
        ) from e
    sys.stderr.write(printed.getvalue())

    graph = gm.graph
    # --- conv units ---------------------------------------------------------------
    units: list[ConvUnit] = []
    excluded: dict[fx.Node, str] = {}
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(modules[n.target], nn.Conv2d):
            continue
        m = modules[n.target]
        if not _is_plain_conv(m):
            excluded[n] = f"conv '{n.target}' is a {type(m).__name__} with its own forward"
            continue
        why = _conv_support(m)
        if why:
            excluded[n] = f"conv '{n.target}' has {why}, which merging does not support"
            continue
        if len(n.args) != 1 or n.kwargs:
            excluded[n] = f"conv '{n.target}' is called with extra arguments"
            continue
        unit = ConvUnit(conv=n)
        user = _only_user(n)
        if user is not None and user.op == "call_module":
            bn = modules[user.target]
            if (
                isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.num_features == m.out_channels
            ):
                act = getattr(bn, "act", None)
                drop = getattr(bn, "drop", None)
                plain = type(bn).forward is nn.BatchNorm2d.forward
                if plain or (
                    isinstance(act, nn.Module)
                    and (drop is None or isinstance(drop, nn.Identity))
                    and (type(act) in ACTIVATION_MODULES or isinstance(act, nn.Identity))
                ):
                    unit.bn = user
                    if not plain and type(act) in ACTIVATION_MODULES:
                        unit.act_in_bn = ACTIVATION_MODULES[type(act)]
        if _after_global_pool(n.args[0], modules, excluded):
            # A conv on a globally pooled map (squeeze-excitation, conv classifiers) is
            # part of the network's constant rest, not of its depth.
            excluded[n] = f"conv '{n.target}' works on a globally pooled map"
            continue
        units.append(unit)

    depth = _conv_depth(graph, modules)

    # --- projections: single conv units on the shallower side of a residual add ------
    by_post = {u.post: u for u in units}
    projections: set[ConvUnit] = set()
    for u in units:
        a = _only_user(u.post)
        if a is None or not _is_add(a) or u.act_in_bn:
            continue
        other = a.args[1] if a.args[0] is u.post else a.args[0]
        ou = by_post.get(other)
        if ou is None or ou.act_in_bn:
            continue
        if u.input is ou.input:
            continue  # two parallel convs: ambiguous, the add stays a rest op
        if depth[u.post] < depth[other]:
            projections.add(u)

    main = [u for u in units if u not in projections]
    frozen_outside: list[str] = []
    if main and not include_stem:
        frozen_outside.append(main[0].conv.target)
        main = main[1:]
    if main and not include_head:
        head = main[-1]
        hm = modules[head.conv.target]
        if hm.kernel_size == (1, 1) and _feeds_global_pool(head, modules):
            frozen_outside.append(head.conv.target)
            main = main[:-1]
    if not main:
        raise TraceError(
            "the model has no convolution that LayerMerge can work on"
            + (f" ({'; '.join(excluded.values())})" if excluded else "")
        )

    L = len(main)
    inputs = {i: u.input for i, u in enumerate(main, start=1)}
    src_of_node = {i - 1: inputs[i] for i in range(1, L + 1)}  # node p's tensor as read next
    node_of_src = {}
    for p, t in src_of_node.items():
        node_of_src.setdefault(t, p)

    info: dict[int, FxNodeInfo] = {}
    skips: list[Skip] = []
    proj_units: dict[tuple[int, int], ConvUnit] = {}
    breaks: dict[int, str] = {}
    proj_by_post = {u.post: u for u in projections}

    for i, u in enumerate(main, start=1):
        fi = FxNodeInfo(unit=u)
        cur = u.post
        if u.act_in_bn:
            fi.act_proto = make_activation(u.act_in_bn)
        else:
            a = _only_user(cur)
            if a is not None and _is_add(a):
                other = a.args[1] if a.args[0] is cur else a.args[0]
                skip = None
                if other in node_of_src and node_of_src[other] < i:
                    skip = Skip(start=node_of_src[other], end=i)
                elif other in proj_by_post:
                    pu = proj_by_post[other]
                    p = node_of_src.get(pu.input)
                    pm = modules[pu.conv.target]
                    if p is not None and p < i:
                        skip = Skip(
                            start=p,
                            end=i,
                            projection=pu.conv.target,
                            projection_bn=pu.bn.target if pu.bn is not None else None,
                            projection_kernel=pm.kernel_size[0],
                            projection_stride=pm.stride[0],
                            projection_padding=_padding(pm),
                        )
                        proj_units[(p, i)] = pu
                if skip is not None:
                    skips.append(skip)
                    fi.add = a
                    cur = a
                else:
                    breaks[i] = f"the add after conv '{u.conv.target}' is not a residual skip"
            act_node = _only_user(cur)
            if act_node is not None:
                found = _activation_of(act_node, modules)
                if found is not None:
                    fi.act = act_node
                    fi.act_proto = found[1]
                    cur = act_node
        fi.out = cur
        info[i] = fi

    activations = {i: _act_name(info[i]) for i in info}

    # --- breaks --------------------------------------------------------------------
    skip_users: dict[int, set[fx.Node]] = {}
    for s in skips:
        user = info[s.end].add if s.projection is None else proj_units[(s.start, s.end)].conv
        skip_users.setdefault(s.start, set()).add(user)
    for i in range(1, L):
        if i in breaks:
            continue
        out, nxt = info[i].out, inputs[i + 1]
        if out is not nxt:
            breaks[i] = f"ops between conv '{main[i - 1].conv.target}' and the next conv"
            continue
        allowed = {main[i].conv} | skip_users.get(i, set())
        extra = [x for x in out.users if x not in allowed]
        if extra:
            breaks[i] = f"the tensor after conv '{main[i - 1].conv.target}' is also used by " + (
                ", ".join(sorted(x.name for x in extra))
            )
    specs: list[ConvSpec] = []
    for i, u in enumerate(main, start=1):
        m = modules[u.conv.target]
        specs.append(
            ConvSpec(
                index=i,
                path=u.conv.target,
                in_channels=m.in_channels,
                out_channels=m.out_channels,
                kernel=m.kernel_size[0],
                stride=m.stride[0],
                padding=_padding(m),
                groups=m.groups,
                bias=m.bias is not None,
                bn_path=u.bn.target if u.bn is not None else None,
                frozen=u.conv.target in freeze,
            )
        )
    # Grouped convs that are not depthwise are never merged with a neighbour.
    for c in specs:
        if c.grouped:
            for b in (c.index - 1, c.index):
                if 0 < b < L:
                    breaks.setdefault(b, f"grouped conv '{c.path}' (groups={c.groups})")
    _stride_breaks(specs, skips, breaks, L)

    nodes: list[Node] = []
    for i in range(L + 1):
        shape = _shape(inputs[i + 1])[1:] if i < L else _shape(info[L].out)[1:]
        is_break = 0 < i < L and i in breaks
        nodes.append(
            Node(
                index=i,
                activation=activations.get(i),
                shape=shape,
                is_break=is_break,
                break_reason=breaks[i] if is_break else None,
            )
        )
    counts = Counter(a for a in activations.values() if a)
    chain = Chain(
        nodes=nodes,
        convs=specs,
        skips=sorted(skips, key=lambda s: (s.start, s.end)),
        input_shape=tuple(input_shape),
        frozen_outside=frozen_outside,
        activation=counts.most_common(1)[0][0] if counts else None,
    )
    return FxTraced(gm, chain, info=info, inputs=inputs, projections=proj_units)


def _act_name(fi: FxNodeInfo) -> str | None:
    if fi.unit.act_in_bn:
        return fi.unit.act_in_bn
    if fi.act is None:
        return None
    for cls, name in ACTIVATION_MODULES.items():
        if type(fi.act_proto) is cls:
            return name
    return None


def _param_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.float32


def _feeds_global_pool(unit: ConvUnit, modules: dict[str, nn.Module]) -> bool:
    cur = unit.post
    for _ in range(3):
        nxt = _only_user(cur)
        if nxt is None:
            return False
        if _is_global_pool(nxt, modules):
            return True
        if _activation_of(nxt, modules) is None:
            return False
        cur = nxt
    return False


def _stride_breaks(specs: list[ConvSpec], skips: list[Skip], breaks: dict[int, str], L: int):
    """The stride rule.

    Merging a strided conv is exact only when every later conv in the merged span
    is 1x1, so the output of a strided conv is a break, except that the break moves
    past the 1x1 convs that follow it inside the same unit (same residual span and
    same enclosing module), e.g. past MobileNetV2's projection after a stride-2
    depthwise conv.
    """
    for c in specs:
        if c.stride == 1:
            continue
        i = c.index
        limit = L
        for s in skips:
            if s.start < i <= s.end:
                limit = min(limit, s.end)
        end = i
        if i < L:
            prefix = _common_prefix(c.path, specs[i].path)
            j = i + 1
            while j <= limit and specs[j - 1].kernel == 1 and (j - 1 == i or j - 1 not in breaks):
                if prefix and not (specs[j - 1].path + ".").startswith(prefix + "."):
                    break
                end = j
                j += 1
        if 0 < end < L:
            breaks.setdefault(end, f"stride {c.stride} of conv '{c.path}'")
