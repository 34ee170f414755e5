"""Hand-written models used by the tests as ``tests/assets/user_models.py:FACTORY``."""

import torch
from torch import nn


class PlainNet(nn.Module):
    """A plain conv stack a user might write: mixed kernels, a 1x1, a stride."""

    def __init__(self, width: int = 8):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, 1, 1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 5, 1, 2),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 2, 1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, 1, 1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1))


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // 2, 1)
        self.fc2 = nn.Conv2d(c // 2, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        a = torch.softmax(q.transpose(1, 2) @ k / c**0.5, dim=-1)
        return x + self.proj((v @ a.transpose(1, 2)).view(b, c, h, w))


class SEAttnNet(nn.Module):
    """Squeeze-excitation and attention on the main path, between mergeable convs."""

    def __init__(self, w: int = 8):
        super().__init__()

        def cbr(cin, cout, k=3):
            return nn.Sequential(
                nn.Conv2d(cin, cout, k, 1, k // 2), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.stem = cbr(3, w)
        self.a = nn.Sequential(cbr(w, w), cbr(w, w))
        self.se = SE(w)
        self.b = nn.Sequential(cbr(w, w), cbr(w, w, 1))
        self.attn = Attention(w)
        self.c = nn.Sequential(cbr(w, w), cbr(w, w))
        self.fc = nn.Linear(w, 4)

    def forward(self, x):
        x = self.a(self.stem(x))
        x = self.b(self.se(x))
        x = self.c(self.attn(x))
        return self.fc(x.mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            return self.conv(x)
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.body(self.stem(x))


def plain(width: int = 8):
    return PlainNet(width)


def se_attn(width: int = 8):
    return SEAttnNet(width)


def untraceable():
    return Untraceable()
