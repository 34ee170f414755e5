"""The chain adapter for diffusers ``UNet2DModel`` (DDPM and its relatives).

torch.fx cannot trace ``UNet2DModel`` (its forward uses Python control flow on
its inputs), so this adapter recognises diffusers' block classes instead and
produces the same :class:`~layermerge.chain.Chain` the fx tracer produces for
CNNs. The order of the blocks is not read off
the class layout but recorded by running the model once with hooks, so any
``UNet2DModel`` configuration (and UNet-like models built from the same blocks)
gets its chain in execution order.

What is in the chain
  * every ``ResnetBlock2D`` (with the default additive time embedding and no
    resampling inside) contributes its two convs. The node between them carries
    ``GroupNorm -> activation``: removing that activation also removes the
    GroupNorm (a per-sample normalisation cannot be merged), so the two convs
    (or the one kept) become one conv. Nodes between blocks are breaks: they
    are followed by the residual add and the next block's GroupNorm, attention,
    skip concatenation or resampling.
  * every ``Upsample2D`` conv (nearest-neighbour x2 then a C -> C conv) is a
    one-conv block whose conv may also be dropped altogether (the identity
    option the paper allows for DDPM's up-sampling convs).
  * ``conv_in``, ``conv_out``, down-sampling convs and attention stay outside
    (their latency is a constant of the network).

The train-time network of a merged span (:class:`TrainResnet`)
  ``norm1 -> act -> conv1 (all padding moved here; zero padding when conv1
  is pruned) -> + time embedding -> dropout -> conv2 (no padding) -> BatchNorm
  -> + shortcut``. The time
  embedding is a per-sample, per-channel constant: with all padding on the first
  conv it reaches every tap of the second conv, so it folds exactly into the
  merged block as the time projection multiplied by the second conv's kernel
  summed over its taps. The BatchNorm after the span (:class:`SpanNorm`) is our
  choice for "a normalisation after the merged span that keeps it trainable":
  GroupNorm cannot stay (it is per-sample, not foldable), while a BatchNorm is a
  per-channel affine map at inference and folds into the merged conv and the
  time projection, yet normalises the now-linear span during fine-tuning. It is
  the identity until its first training batch, where it calibrates itself to
  that batch's statistics (weight = std, bias = mean), so the network starts
  fine-tuning from exactly the activation-free network.

The deploy network (:func:`merge`) replaces each span by :class:`MergedResnet`
(one conv plus a folded time projection) and is verified against the
train-time network on random inputs and random timesteps.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..chain import Chain, ConvSpec, Node, Skip
from ..ops import ACTIVATION_MODULES, Affine, make_activation, option_conv
from ..plan import Plan, PlanBlock
from .base import Family, TracedModel, TraceError, copy_marks, mark

DEFAULT_TIMESTEP = 500  # the timestep of example inputs (tracing and latency)
NUM_TRAIN_TIMESTEPS = 1000  # random timesteps of verification are drawn below this


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def is_unet(model: nn.Module) -> bool:
    """Whether ``model`` is a diffusers ``UNet2DModel`` (checked without importing
    diffusers)."""
    return "UNet2DModel" in _class_names(model)


def _is_resnet(m: nn.Module) -> bool:
    return "ResnetBlock2D" in _class_names(m)


def _is_upsample(m: nn.Module) -> bool:
    return "Upsample2D" in _class_names(m)


def _activation_name(m: nn.Module) -> str | None:
    return ACTIVATION_MODULES.get(type(m))


def _plain_conv(c: nn.Module) -> bool:
    return (
        type(c) is nn.Conv2d
        and c.kernel_size[0] == c.kernel_size[1]
        and c.kernel_size[0] % 2 == 1
        and c.stride == (1, 1)
        and c.dilation == (1, 1)
        and c.groups == 1
        and c.padding_mode == "zeros"
        and c.padding == (c.kernel_size[0] // 2,) * 2
    )


def _resnet_unsupported(m: nn.Module) -> str | None:
    """Why a ResnetBlock2D cannot be put in the chain (None: it can)."""
    if getattr(m, "time_embedding_norm", "default") != "default":
        return f"time_embedding_norm={m.time_embedding_norm!r} (only 'default' folds)"
    if getattr(m, "upsample", None) is not None or getattr(m, "downsample", None) is not None:
        return "resamples inside the block"
    if not (_plain_conv(m.conv1) and _plain_conv(m.conv2)):
        return "conv1/conv2 are not plain stride-1 'same' convs"
    if _activation_name(m.nonlinearity) is None:
        return f"activation {type(m.nonlinearity).__name__} is not in the chain's vocabulary"
    if not isinstance(m.norm2, nn.GroupNorm):
        return f"norm2 is {type(m.norm2).__name__}, not GroupNorm"
    return None


@dataclass
class UNetUnit:
    """A block class of the UNet that contributes convs to the chain."""

    kind: str  # "resnet" or "upsample"
    path: str  # module path of the ResnetBlock2D / Upsample2D
    convs: tuple[int, ...]  # its chain conv indices
    start: int  # chain node before its first conv

    @property
    def end(self) -> int:
        return self.start + len(self.convs)


@dataclass(eq=False)
class UNetTraced(TracedModel):
    """A ``UNet2DModel`` (``model``) with its chain and the blocks the chain came from."""

    units: list[UNetUnit] = field(default_factory=list)
    outside: dict[str, str] = field(default_factory=dict)  # module path -> why not in the chain
    timestep: int = DEFAULT_TIMESTEP

    def unit_of(self, conv: int) -> UNetUnit:
        for u in self.units:
            if conv in u.convs:
                return u
        raise KeyError(conv)


def example_inputs(
    model: nn.Module, input_shape: Sequence[int], batch: int = 1, timestep: int = DEFAULT_TIMESTEP
) -> tuple[torch.Tensor, torch.Tensor]:
    p = next(model.parameters())
    x = torch.zeros(batch, *input_shape, dtype=p.dtype, device=p.device)
    t = torch.full((batch,), timestep, dtype=torch.long, device=p.device)
    return x, t


def trace_unet(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    freeze: Sequence[str] = (),
    timestep: int = DEFAULT_TIMESTEP,
) -> UNetTraced:
    """The chain of a ``UNet2DModel`` (see the module docstring)."""
    model = model.eval()
    if input_shape is None:
        cfg = model.config
        input_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))
    modules = dict(model.named_modules())
    unknown = set(freeze) - set(modules)
    if unknown:
        raise TraceError(f"--freeze names modules that do not exist: {sorted(unknown)}")
    not_conv = sorted(f for f in freeze if not isinstance(modules[f], nn.Conv2d))
    if not_conv:
        kinds = ", ".join(f"{f} is a {type(modules[f]).__name__}" for f in not_conv)
        raise TraceError(f"--freeze names modules that are not a Conv2d ({kinds}): name convs")
    order: list[str] = []
    conv_in: dict[str, tuple[int, ...]] = {}
    conv_out: dict[str, tuple[int, ...]] = {}
    handles = []

    def block_hook(path):
        def hook(_m, _args):
            order.append(path)

        return hook

    def conv_hook(path):
        def hook(_m, args, out):
            conv_in.setdefault(path, tuple(args[0].shape[1:]))
            conv_out.setdefault(path, tuple(out.shape[1:]))

        return hook

    for path, m in modules.items():
        if _is_resnet(m) or _is_upsample(m):
            handles.append(m.register_forward_pre_hook(block_hook(path)))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(path)))
    try:
        with torch.no_grad():
            model(*example_inputs(model, input_shape, timestep=timestep))
    except Exception as e:
        raise TraceError(
            f"running the UNet on an input of shape {(1, *input_shape)} failed: "
            f"{type(e).__name__}: {e}. Check --input-shape."
        ) from e
    finally:
        for h in handles:
            h.remove()
    repeated = sorted({p for p in order if order.count(p) > 1})
    if repeated:
        raise TraceError(
            f"blocks {repeated[:3]} run more than once per forward; a chain needs each block "
            "to run once"
        )

    convs: list[ConvSpec] = []
    units: list[UNetUnit] = []
    outside: dict[str, str] = {}
    mids: set[int] = set()
    act_name = None
    freeze = set(freeze)

    def spec(path: str, **kw) -> ConvSpec:
        c = modules[path]
        return ConvSpec(
            index=len(convs) + 1,
            path=path,
            in_channels=c.in_channels,
            out_channels=c.out_channels,
            kernel=c.kernel_size[0],
            stride=c.stride[0],
            padding=c.padding[0],
            groups=c.groups,
            bias=c.bias is not None,
            frozen=path in freeze,
            **kw,
        )

    skips: list[Skip] = []
    for path in order:
        m = modules[path]
        start = len(convs)
        if _is_resnet(m):
            why = _resnet_unsupported(m)
            if why is not None:
                outside[path] = why
                continue
            act_name = act_name or _activation_name(m.nonlinearity)
            convs.append(spec(f"{path}.conv1"))
            mids.add(len(convs))
            convs.append(spec(f"{path}.conv2"))
            sc = m.conv_shortcut
            skips.append(
                Skip(
                    start=start,
                    end=start + 2,
                    projection=f"{path}.conv_shortcut" if sc is not None else None,
                    projection_kernel=sc.kernel_size[0] if sc is not None else 1,
                    projection_padding=sc.padding[0] if sc is not None else 0,
                )
            )
            units.append(UNetUnit("resnet", path, (start + 1, start + 2), start))
        else:
            conv = getattr(m, "conv", None)
            if (
                not getattr(m, "use_conv", False)
                or getattr(m, "use_conv_transpose", False)
                or getattr(m, "norm", None) is not None
                or not isinstance(conv, nn.Conv2d)
                or not _plain_conv(conv)
                or conv.in_channels != conv.out_channels
            ):
                outside[path] = "not a nearest-neighbour up-sampling followed by a C->C conv"
                continue
            convs.append(spec(f"{path}.conv", allow_empty=True))
            units.append(UNetUnit("upsample", path, (start + 1,), start))
    if not convs:
        raise TraceError(
            "the UNet has no ResnetBlock2D or Upsample2D convs that LayerMerge can compress"
        )
    # node shapes: what the next conv reads; the last node: the last conv's output
    L = len(convs)
    nodes = []
    for i in range(L + 1):
        shape = conv_in[convs[i].path] if i < L else conv_out[convs[-1].path]
        if i in mids:
            nodes.append(Node(i, act_name, shape))
        else:
            reason = "input of the chain" if i == 0 else "end of the chain"
            if 0 < i < L:
                prev, nxt = convs[i - 1].path, convs[i].path
                reason = (
                    f"between {prev.rsplit('.', 1)[0]} and {nxt.rsplit('.', 1)[0]} (residual "
                    "add, GroupNorm, attention, concatenation or resampling)"
                )
            nodes.append(Node(i, None, shape, is_break=True, break_reason=reason))
    in_chain = {c.path for c in convs} | {s.projection for s in skips if s.projection}
    frozen_outside = [
        p
        for p, m in modules.items()
        if isinstance(m, nn.Conv2d) and p not in in_chain and p in conv_in
    ]
    chain = Chain(
        nodes=nodes,
        convs=convs,
        skips=skips,
        input_shape=tuple(input_shape),
        frozen_outside=frozen_outside,
        activation=act_name,
    )
    return UNetTraced(model, chain, units=units, outside=outside, timestep=timestep)


# ---------------------------------------------------------------------------
# the train-time network


class SpanNorm(nn.BatchNorm2d):
    """The BatchNorm after a merged span (see the module docstring): the identity
    until its first training batch, which sets weight/bias to that batch's
    std/mean and the running statistics to its statistics."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__(channels, eps=eps)
        with torch.no_grad():
            self.running_var.fill_(1.0 - eps)  # sqrt(var + eps) == 1: exactly the identity
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.calibrated):
            with torch.no_grad():
                dims = (0, 2, 3)
                mean = x.detach().mean(dims)
                var = x.detach().var(dims, unbiased=False)
                self.weight.copy_(torch.sqrt(var + self.eps))
                self.bias.copy_(mean)
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                self.calibrated.fill_(True)
        return super().forward(x)


class TrainResnet(nn.Module):
    """A ``ResnetBlock2D`` whose inner GroupNorm and activation are removed and whose
    kept convs (one or both) form one span; exactly equal to :class:`MergedResnet`."""

    def __init__(self, block: nn.Module, keep1: bool, keep2: bool) -> None:
        super().__init__()
        if not (keep1 or keep2):
            raise ValueError("a ResnetBlock2D span keeps at least one conv")
        self.in_channels = block.conv1.in_channels
        self.out_channels = block.conv2.out_channels
        self.norm1 = block.norm1
        self.nonlinearity = block.nonlinearity
        self.pad = (block.conv1.padding[0] if keep1 else 0) + (
            block.conv2.padding[0] if keep2 else 0
        )
        self.conv1 = block.conv1 if keep1 else None
        self.conv2 = block.conv2 if keep2 else None
        # all padding goes to the span's input, before the time embedding is added:
        # then the embedding reaches every tap of conv2, also at the borders
        if keep1:
            self.conv1.padding = (self.pad, self.pad)
        if keep2:
            self.conv2.padding = (0, 0)
        self.time_emb_proj = block.time_emb_proj
        self.skip_time_act = bool(getattr(block, "skip_time_act", False))
        self.dropout = block.dropout
        self.span_norm = SpanNorm(self.out_channels)
        self.conv_shortcut = block.conv_shortcut
        self.output_scale_factor = block.output_scale_factor
        p = next(block.parameters())
        self.span_norm.to(device=p.device, dtype=p.dtype)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
        h = self.nonlinearity(self.norm1(input_tensor))
        if self.conv1 is not None:
            h = self.conv1(h)
        elif self.pad:
            h = F.pad(h, [self.pad] * 4)
        if self.time_emb_proj is not None and temb is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            h = h + self.time_emb_proj(t)[:, :, None, None]
        h = self.dropout(h)
        if self.conv2 is not None:
            h = self.conv2(h)
        h = self.span_norm(h)
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (x + h) / self.output_scale_factor

    def extra_repr(self) -> str:
        kept = [n for n, c in (("conv1", self.conv1), ("conv2", self.conv2)) if c is not None]
        return f"kept={kept}, pad={self.pad}"


class MergedResnet(nn.Module):
    """A merged ``ResnetBlock2D``: ``norm1 -> act -> one conv -> + folded time
    projection -> + shortcut``."""

    def __init__(self, src: TrainResnet, conv: nn.Conv2d, time_proj: nn.Linear | None) -> None:
        super().__init__()
        self.in_channels = src.in_channels
        self.out_channels = src.out_channels
        self.norm1 = src.norm1
        self.nonlinearity = src.nonlinearity
        self.conv = conv
        self.time_emb_proj = time_proj
        self.skip_time_act = src.skip_time_act
        self.conv_shortcut = src.conv_shortcut
        self.output_scale_factor = src.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs):
        h = self.conv(self.nonlinearity(self.norm1(input_tensor)))
        if self.time_emb_proj is not None and temb is not None:
            t = temb if self.skip_time_act else self.nonlinearity(temb)
            h = h + self.time_emb_proj(t)[:, :, None, None]
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        return (x + h) / self.output_scale_factor


def apply(traced: UNetTraced, plan: Plan) -> nn.Module:
    """The train-time network of ``plan``: a copy of the UNet (still a
    ``UNet2DModel``, usable in diffusers pipelines) with every merged span replaced
    by a :class:`TrainResnet` and every dropped up-sampling conv by the identity."""
    net = copy.deepcopy(traced.model)
    for block in plan.blocks:
        units = {traced.unit_of(i).path for i in range(block.start + 1, block.end + 1)}
        if len(units) != 1:  # breaks separate units; check_plan has refused this already
            raise ValueError(f"block ({block.start}, {block.end}) spans several UNet blocks")
        unit = traced.unit_of(block.end)
        kept = set(block.kept_convs)
        if unit.kind == "upsample":
            if not kept:
                net.get_submodule(unit.path).conv = nn.Identity()
            continue
        if (block.start, block.end) != (unit.start, unit.end):
            # a one-conv block of a ResnetBlock2D: its activation stays; dropped by
            # layer pruning, the conv becomes the identity (GroupNorm and activation
            # stay around it)
            if not kept:
                attr = "conv1" if block.end == unit.convs[0] else "conv2"
                setattr(net.get_submodule(unit.path), attr, nn.Identity())
            continue
        c1, c2 = unit.convs
        new = TrainResnet(net.get_submodule(unit.path), c1 in kept, c2 in kept)
        net.set_submodule(unit.path, new)
    mark(net, UNET, plan, traced.chain.input_shape, timestep=traced.timestep)
    return net


# ---------------------------------------------------------------------------
# merging


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    var = bn.running_var.detach().double()
    scale = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    return scale, bn.bias.detach().double() - bn.running_mean.detach().double() * scale


def _conv_wb(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    w = conv.weight.detach().double()
    b = conv.bias.detach().double() if conv.bias is not None else w.new_zeros(w.shape[0])
    return w, b


def merge_resnet(tr: TrainResnet) -> MergedResnet:
    """One conv (+ folded time projection) computing exactly what ``tr`` computes in
    eval mode."""
    p = next(tr.parameters())
    if tr.conv1 is not None and tr.conv2 is not None:
        w1, b1 = _conv_wb(tr.conv1)
        w2, b2 = _conv_wb(tr.conv2)
        aff = Affine.identity(w1.shape[1], w1.device).then_conv(w1, b1, 1, 1)
        aff = aff.then_conv(w2, b2, 1, 1)
        w, b = aff.dense(), aff.bias
        P = w2.sum(dim=(-1, -2))  # what a per-channel constant before conv2 becomes
    elif tr.conv1 is not None:
        w, b = _conv_wb(tr.conv1)
        P = torch.eye(w.shape[0], dtype=torch.float64, device=w.device)
    else:
        w, b = _conv_wb(tr.conv2)
        P = w.sum(dim=(-1, -2))
    scale, shift = _bn_affine(tr.span_norm)
    w = w * scale[:, None, None, None]
    b = b * scale + shift
    P = P * scale[:, None]
    conv = nn.Conv2d(
        w.shape[1], w.shape[0], w.shape[-1], padding=tr.pad, bias=True, device=p.device
    ).to(p.dtype)
    with torch.no_grad():
        conv.weight.copy_(w.to(p.dtype))
        conv.bias.copy_(b.to(p.dtype))
    time_proj = None
    if tr.time_emb_proj is not None:
        src = tr.time_emb_proj
        wt = src.weight.detach().double()
        bt = src.bias.detach().double() if src.bias is not None else wt.new_zeros(wt.shape[0])
        time_proj = nn.Linear(wt.shape[1], P.shape[0], bias=True, device=p.device).to(p.dtype)
        with torch.no_grad():
            time_proj.weight.copy_((P @ wt).to(p.dtype))
            time_proj.bias.copy_((P @ bt).to(p.dtype))
    return MergedResnet(tr, conv, time_proj)


def merge(train_net: nn.Module) -> nn.Module:
    """The deploy network of a train-time UNet made by :func:`apply` (unverified)."""
    was_training = train_net.training
    train_net.eval()
    deploy = copy.deepcopy(train_net).eval()
    for path, m in list(deploy.named_modules()):
        if isinstance(m, TrainResnet):
            with torch.no_grad():
                deploy.set_submodule(path, merge_resnet(m))
    copy_marks(train_net, deploy)
    train_net.train(was_training)
    return deploy


def randomize_span_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every :class:`SpanNorm` random statistics (in place), so that
    verification checks their folding rather than an identity."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, SpanNorm):

            def u(lo, hi, n=m.num_features, like=m.running_mean):
                return (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(like)

            with torch.no_grad():
                m.running_mean.copy_(u(-0.2, 0.2))
                m.running_var.copy_(u(0.5, 2.0))
                m.weight.copy_(u(0.6, 1.4))
                m.bias.copy_(u(-0.2, 0.2))
    return net


def count_layers(net: nn.Module) -> dict[str, int]:
    """Conv modules and activation calls on the UNet's feature path (the time-embedding
    MLP's activations are not counted): an unmerged ResnetBlock2D applies its
    activation twice, a merged one once."""
    convs = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d))
    acts = 0
    for m in net.modules():
        if _is_resnet(m):
            acts += 2
        elif isinstance(m, (TrainResnet, MergedResnet)):
            acts += 1
    return {"convs": convs, "activations": acts}


# ---------------------------------------------------------------------------
# latency


def _sample(y) -> torch.Tensor:
    return y.sample if hasattr(y, "sample") else y


class UNetForward(nn.Module):
    """``x -> unet(x, t).sample`` at a fixed timestep: the UNet as a one-input module
    for the latency backends (PyTorch and ONNX Runtime)."""

    def __init__(self, unet: nn.Module, timestep: int = DEFAULT_TIMESTEP) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("timestep", torch.tensor([timestep], dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _sample(self.unet(x, self.timestep.expand(x.shape[0])))


class UNetExport(nn.Module):
    """``(sample, timestep) -> unet(sample, timestep).sample``: the UNet with the
    timestep as an input (one int64 timestep per sample), as the exporters write it."""

    #: the UNet traces for a limited batch range: the exporters take the one they find
    export_batch_range = "auto"

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return _sample(self.unet(sample, timestep))

    def export_examples(self, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random samples and a different random timestep for each."""
        g = torch.Generator().manual_seed(seed)
        shape = tuple(self.unet.layermerge_input_shape)
        p = next(self.unet.parameters())
        x = torch.randn(batch, *shape, generator=g).to(p.dtype)
        t = torch.randperm(NUM_TRAIN_TIMESTEPS, generator=g)[:batch]
        return x, t


class PipelineUNet(nn.Module):
    """A deployed UNet behind the ``UNet2DModel`` call signature, for diffusers
    pipelines: ``unet(sample, timestep).sample``.

    ``fn(sample, timestep)`` is the exported network (``onnx_module(path)``,
    ``torch.export.load(path).module()`` or a deploy network wrapped in
    :class:`UNetExport`); ``config`` is the original model's (``sample_size`` and
    ``in_channels`` are what pipelines read)."""

    def __init__(self, fn, config, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.fn = fn
        self.config = config
        self._dtype = dtype
        # a buffer gives the module a device, which pipelines read
        self.register_buffer("_anchor", torch.zeros(0, dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True):
        if class_labels is not None:
            raise ValueError("this UNet was exported without class conditioning")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).to(torch.long).expand(sample.shape[0]).contiguous()
        out = self.fn(sample.to(self._dtype), t)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)


def option_module(traced: UNetTraced, option: PlanBlock) -> nn.Module:
    """What an option costs in the deploy network: the merged conv, followed by the
    kept GroupNorm and activation when the block ends at a ResnetBlock2D's inner node
    and keeps its activation.

    A ResnetBlock2D's residual add is not part of any entry: its shortcut reads the
    block's input before ``norm1 -> activation``, so no merge can fold it into a
    kernel and it is paid by every plan (the table's constant holds it)."""
    node = traced.chain.nodes[option.end]
    keeps_act = not node.is_break and node.activation is not None and option.activation
    if not option.kept_convs:
        # a dropped conv: at a ResnetBlock2D's inner node the GroupNorm and the
        # activation still run
        if not keeps_act:
            return nn.Identity()
        block = traced.module(traced.unit_of(option.end).path)
        return nn.Sequential(copy.deepcopy(block.norm2), make_activation(node.activation))
    conv = option_conv(traced.chain, option)
    if not keeps_act:
        return conv
    block = traced.module(traced.unit_of(option.end).path)
    norm = copy.deepcopy(block.norm2)
    return nn.Sequential(conv, norm, make_activation(node.activation))


# ---------------------------------------------------------------------------
# the family


class UNet2DFamily(Family):
    """diffusers ``UNet2DModel`` and models built from the same block classes."""

    name = "diffusers-unet"
    takes_timestep = True
    #: 2: a ResnetBlock2D conv dropped by layer pruning is the identity in the network
    #: and costs its GroupNorm and activation in the latency table (1: it was kept)
    version = 2

    def claims(self, model: nn.Module) -> bool:
        return is_unet(model)

    def default_input_shape(self, model: nn.Module) -> tuple[int, ...] | None:
        cfg = getattr(model, "config", None)
        if cfg is None or getattr(cfg, "sample_size", None) is None:
            return None
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(cfg.in_channels), int(h), int(w))

    def trace(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        include_stem: bool = False,
        include_head: bool = False,
        freeze: Sequence[str] = (),
    ) -> UNetTraced:
        # conv_in and conv_out stay outside the chain whatever include_stem/head say:
        # the chain holds only the ResnetBlock2D and up-sampling convs
        return trace_unet(model, input_shape, freeze=freeze)

    def apply(self, traced: UNetTraced, plan: Plan) -> nn.Module:
        return apply(traced, plan)

    def merge(self, train_net: nn.Module) -> nn.Module:
        return merge(train_net)

    def example_inputs(
        self,
        net: nn.Module,
        batch: int = 1,
        *,
        generator: torch.Generator | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        shape = tuple(input_shape or net.layermerge_input_shape)
        if generator is None:
            t = getattr(net, "layermerge_timestep", DEFAULT_TIMESTEP)
            return example_inputs(net, shape, batch, timestep=t)
        p = next(net.parameters())
        x = torch.randn(batch, *shape, generator=generator, dtype=torch.float64)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=generator)
        return x.to(p.device, p.dtype), t.to(p.device)

    def forward_module(self, net: nn.Module) -> nn.Module:
        return UNetForward(net, getattr(net, "layermerge_timestep", DEFAULT_TIMESTEP))

    def export_module(self, net: nn.Module) -> nn.Module:
        return UNetExport(net)

    def randomize_for_verification(self, train_net: nn.Module, seed: int) -> None:
        randomize_span_norms(train_net, seed)

    def reinit_single_conv(self, train_net: nn.Module, option: PlanBlock, chain: Chain) -> None:
        # a one-conv block's conv stays where it was in the UNet: reset it there
        for i in option.kept_convs:
            train_net.get_submodule(chain.conv(i).path).reset_parameters()

    def count_layers(self, net: nn.Module) -> dict[str, int]:
        return count_layers(net)

    def option_module(self, traced: UNetTraced, option: PlanBlock) -> nn.Module:
        return option_module(traced, option)


UNET = UNet2DFamily()
UNetTraced.family = UNET
