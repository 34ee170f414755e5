"""Small built-in models (``layermerge:NAME``) for small images, tests and the demo.

CIFAR-style ResNets (He et al. 2016, section 4.2): a 3x3 stem, three stages of
basic blocks at widths w, 2w, 4w, stride 2 at the start of stages 2 and 3 with a
1x1 projection shortcut, global average pooling and a linear classifier.

``mobilenetv2_mini``: a MobileNetV2 (Sandler et al. 2018) sized for 28x28 images:
inverted residual blocks (expand 1x1 conv + BN + ReLU6, depthwise 3x3 + BN +
ReLU6, project 1x1 + BN, identity residual when the shapes match), 8-32 channels
at ``width_mult`` 1.0.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 20, width: int = 16, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("depth must be 6n+2 (8, 14, 20, 32, 44, 56, ...)")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


class PlainCNN(nn.Module):
    """A VGG-like stack of conv-BN-ReLU layers without skips (a user-style model)."""

    def __init__(self, widths=(16, 16, 32, 32, 32), num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers, cin = [], in_chans
        for i, w in enumerate(widths):
            stride = 2 if i in (2,) else 1
            layers += [nn.Conv2d(cin, w, 3, stride, 1), nn.BatchNorm2d(w), nn.ReLU()]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _make_divisible(v: float, divisor: int = 4) -> int:
    """``v`` rounded to a multiple of ``divisor``, never 10 % below ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
    layers = [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: [expand 1x1] -> depthwise 3x3 -> project 1x1 (linear), with
    an identity residual when stride is 1 and the widths match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2Mini(nn.Module):
    """A MobileNetV2 for 28x28 (or 32x32) images: a 3x3 stem at stride 1, seven inverted
    residual blocks (expansion, width, repeats, first stride) (1, 8, 1, 1), (4, 16, 2,
    2), (4, 24, 2, 2), (4, 32, 2, 1) scaled by ``width_mult`` (widths rounded to
    multiples of 4), a 1x1 conv to 4x the last width, global average pooling and a
    linear classifier. Maps: 28x28 -> 14x14 -> 7x7."""

    SETTINGS = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 2, 1))

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0):
        super().__init__()
        stem = _make_divisible(16 * width_mult)
        layers: list[nn.Module] = [_conv_bn(in_chans, stem, 3)]
        cin = stem
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = 4 * cin
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _resnet(depth: int) -> Callable[..., nn.Module]:
    def make(**kw) -> nn.Module:
        return CifarResNet(depth=depth, **kw)

    make.__doc__ = f"CIFAR-style ResNet-{depth}."
    return make


#: name -> (factory, default input shape)
REGISTRY: dict[str, tuple[Callable[..., nn.Module], tuple[int, int, int]]] = {
    "resnet8": (_resnet(8), (3, 32, 32)),
    "resnet14": (_resnet(14), (3, 32, 32)),
    "resnet20": (_resnet(20), (3, 32, 32)),
    "resnet32": (_resnet(32), (3, 32, 32)),
    "resnet56": (_resnet(56), (3, 32, 32)),
    "plaincnn": (PlainCNN, (3, 32, 32)),
    "mobilenetv2_mini": (MobileNetV2Mini, (3, 28, 28)),
}


def list_models() -> list[str]:
    return sorted(REGISTRY)
