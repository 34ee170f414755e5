"""Random small CNN architectures for property tests: residual units of 1-3 convs with
mixed kernels, depthwise convs, strides, activations (or none) and identity or
projection skips."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st
from torch import nn

ACTS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "silu": nn.SiLU,
    "hardswish": nn.Hardswish,
    "gelu": nn.GELU,
    None: nn.Identity,
}


@dataclass(frozen=True)
class ConvDef:
    cout: int
    kernel: int
    stride: int
    depthwise: bool
    act: str | None


@dataclass(frozen=True)
class UnitDef:
    convs: tuple[ConvDef, ...]
    skip: str  # "none", "identity", "proj"


class Unit(nn.Module):
    def __init__(self, cin: int, d: UnitDef):
        super().__init__()
        self.convs = nn.ModuleList()
        self.bns = nn.ModuleList()
        self.acts = nn.ModuleList()
        c, stride = cin, 1
        for cd in d.convs:
            groups = c if cd.depthwise else 1
            self.convs.append(
                nn.Conv2d(
                    c, cd.cout, cd.kernel, cd.stride, cd.kernel // 2, groups=groups, bias=False
                )
            )
            self.bns.append(nn.BatchNorm2d(cd.cout))
            self.acts.append(ACTS[cd.act]())
            c, stride = cd.cout, stride * cd.stride
        self.skip = d.skip
        if d.skip == "proj":
            self.proj = nn.Conv2d(cin, c, 1, stride, bias=False)
            self.proj_bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = x
        n = len(self.convs)
        for i in range(n):
            y = self.bns[i](self.convs[i](y))
            if i < n - 1:
                y = self.acts[i](y)
        if self.skip == "identity":
            y = y + x
        elif self.skip == "proj":
            y = y + self.proj_bn(self.proj(x))
        return self.acts[n - 1](y)


class RandomCNN(nn.Module):
    def __init__(self, units: tuple[UnitDef, ...], width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1)
        layers, c = [], width
        for u in units:
            layers.append(Unit(c, u))
            c = u.convs[-1].cout
        self.units = nn.Sequential(*layers)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


@st.composite
def unit_defs(draw, cin: int):
    n = draw(st.integers(1, 3))
    convs, c, strided = [], cin, False
    for _ in range(n):
        kernel = draw(st.sampled_from([1, 3, 5]))
        depthwise = kernel > 1 and draw(st.booleans())
        cout = c if depthwise else draw(st.sampled_from([c, c, 4, 6, 8]))
        stride = 2 if (not strided and draw(st.integers(0, 4)) == 0) else 1
        strided |= stride == 2
        act = draw(st.sampled_from(["relu", "relu6", "silu", "hardswish", "gelu", None]))
        convs.append(ConvDef(cout, kernel, stride, depthwise, act))
        c = cout
    options = ["none", "proj"]
    if c == cin and not strided:
        options.append("identity")
    return UnitDef(tuple(convs), draw(st.sampled_from(options)))


@st.composite
def architectures(draw, width: int = 4):
    units, c = [], width
    for _ in range(draw(st.integers(1, 4))):
        u = draw(unit_defs(c))
        units.append(u)
        c = u.convs[-1].cout
    return tuple(units)
