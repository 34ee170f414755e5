"""What a plan builds, independent of the model family: the activation vocabulary of
the chain, the algebra that composes convolutions (and folds BatchNorm) into one
convolution, and the conv an option merges into."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .chain import Chain
from .plan import PlanBlock, PlanError
from .space import merged_geometry
from .tables import format_key

# Activations that a chain node may carry. Names are the chain's vocabulary.
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.LeakyReLU: "leaky_relu",
    nn.Mish: "mish",
    nn.ELU: "elu",
}


def make_activation(name: str) -> nn.Module:
    """A fresh module for an activation name of the chain's vocabulary."""
    for cls, n in ACTIVATION_MODULES.items():
        if n == name:
            return cls()
    raise ValueError(f"unknown activation {name!r}")


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in, in float64."""
    w = conv.weight.detach().double()
    b = (
        conv.bias.detach().double()
        if conv.bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
    )
    if bn is None:
        return w, b
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return w * scale[:, None, None, None], (b - mean) * scale + beta


@dataclass
class Affine:
    """An affine map from the padded block input x:
    ``out[v] = sum_t W[t] x[v*stride + offset + t] + b``; ``weight=None`` is the identity
    (kept implicit: materialising it and multiplying by it is the costly part)."""

    weight: torch.Tensor | None  # (C_out, C_in, K, K)
    bias: torch.Tensor
    stride: int
    offset: int = 0

    @classmethod
    def identity(cls, channels: int, device) -> Affine:
        return cls(None, torch.zeros(channels, dtype=torch.float64, device=device), 1)

    def shifted(self, taps: int) -> Affine:
        # cropping a tensor by c shifts its receptive field by c*stride taps
        return Affine(self.weight, self.bias, self.stride, self.offset + taps)

    def dense(self) -> torch.Tensor:
        w = self.weight
        if w is None:
            w = torch.eye(len(self.bias), dtype=torch.float64, device=self.bias.device)
            w = w[:, :, None, None]
        return F.pad(w, [self.offset, 0, self.offset, 0])

    def then_conv(self, w: torch.Tensor, b: torch.Tensor, stride: int, groups: int) -> Affine:
        # Composition of two cross-correlations is one whose kernel is the full
        # convolution of the two kernels, the second dilated by the first's stride:
        # tap t2 of the second conv lands at offset t2*stride of the first's kernel.
        if groups > 1:
            w = dw_dense(w, groups)
        wsum = w.sum(dim=(-1, -2))  # (C_out, C_in)
        bias = b + wsum @ self.bias
        if self.weight is None:
            return Affine(w.clone(), bias, self.stride * stride, self.offset)
        W1, S = self.weight, self.stride
        c_out, c_mid = w.shape[:2]
        c_in, k1, k2 = W1.shape[1], W1.shape[-1], w.shape[-1]
        K = k1 + S * (k2 - 1)
        out = torch.zeros(c_out, c_in, K, K, dtype=W1.dtype, device=W1.device)
        flat = W1.reshape(c_mid, -1)
        diag = groups > 1
        for ty in range(k2):
            for tx in range(k2):
                if diag:
                    part = w[:, :, ty, tx].diagonal()[:, None] * flat
                else:
                    part = w[:, :, ty, tx] @ flat
                out[:, :, ty * S : ty * S + k1, tx * S : tx * S + k1] += part.view(
                    c_out, c_in, k1, k1
                )
        return Affine(out, bias, S * stride, self.offset)

    def plus(self, other: Affine) -> Affine:
        assert self.stride == other.stride
        a, b = self.dense(), other.dense()
        k = max(a.shape[-1], b.shape[-1])

        def grow(w):
            d = k - w.shape[-1]
            return F.pad(w, [0, d, 0, d])

        return Affine(grow(a) + grow(b), self.bias + other.bias, self.stride)


def dw_dense(w: torch.Tensor, groups: int) -> torch.Tensor:
    """Depthwise weight (C, 1, k, k) as a dense diagonal (C, C, k, k)."""
    if w.shape[1] != 1 or groups != w.shape[0]:
        raise ValueError("only dense and depthwise convs can be merged")
    c = w.shape[0]
    out = torch.zeros(c, c, *w.shape[-2:], dtype=w.dtype, device=w.device)
    idx = torch.arange(c, device=w.device)
    out[idx, idx] = w[:, 0]
    return out


def option_conv(chain: Chain, option: PlanBlock) -> nn.Conv2d:
    """The conv an option merges into (random weights: latency does not depend on them)."""
    c_in = chain.nodes[option.start].shape[0]
    c_out = chain.conv(option.end).out_channels
    kernel, stride, pad = merged_geometry(chain, option.kept_convs)
    if (kernel, stride) != (option.kernel, option.stride):
        raise PlanError(
            f"option {format_key(option.key)}: its kept convs {list(option.kept_convs)} merge "
            f"into kernel {kernel}, stride {stride}"
        )
    groups = c_in if option.depthwise and c_in == c_out else 1
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, groups=groups, bias=True)
