"""Dataset images -> model inputs: channels, size, normalisation, augmentation.

:class:`Augment` says which training augmentation to apply, :class:`Transform`
applies it together with the conversion to the model's input (channels, size,
normalisation), either to a batch of in-memory uint8 images or to one image file.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .formats import DataError


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random shifts by up to ``pad`` pixels, horizontal flips,
    or (folders) random-resized crops."""

    pad: int = 0
    flip: bool = False
    resized_crop: bool = False


@dataclass(frozen=True)
class Transform:
    """Dataset images -> the model's input: channels, size, normalisation.

    Grayscale images are repeated to 3 channels for a 3-channel model (and colour
    images converted to luminance for a 1-channel one). In-memory images are
    zero-padded to the model's size when it is at most 25% larger (28 -> 32, the
    usual way to feed MNIST-like data to CIFAR networks), resized otherwise.
    Folder images are resized and centre-cropped (evaluation) or randomly
    resized-cropped (training) to the model's size.
    """

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: Augment

    def _stats(self, source_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=torch.float32)
        std = torch.tensor(self.std, dtype=torch.float32)
        if len(mean) == 1 and self.channels > 1:
            mean, std = mean.repeat(self.channels), std.repeat(self.channels)
        elif len(mean) == 3 and self.channels == 1:
            w = torch.tensor(_LUMA)
            mean, std = (w * mean).sum(0, keepdim=True), (w * std).sum(0, keepdim=True)
        return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(-1, self.channels, -1, -1)
        if c == 3 and self.channels == 1:
            return (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
        raise DataError(f"cannot feed {c}-channel images to a {self.channels}-channel model")

    def _size(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        H, W = self.height, self.width
        if (h, w) == (H, W):
            return x
        if H >= h and W >= w and H <= 1.25 * h and W <= 1.25 * w:
            top, left = (H - h) // 2, (W - w) // 2
            return F.pad(x, [left, W - w - left, top, H - h - top])
        return F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)

    def batch(self, images: torch.Tensor, train: bool, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``(B, C, h, w)`` -> normalised float ``(B, channels, height, width)``."""
        x = images.float().div_(255.0)
        x = self._size(self._channels(x))
        if train:
            x = self._random_shift_flip(x, generator)
        mean, std = self._stats(images.shape[1])
        return (x - mean) / std

    def _random_shift_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        a, B = self.augment, x.shape[0]
        if a.pad:
            p = a.pad
            padded = F.pad(x, [p, p, p, p])
            off = torch.randint(0, 2 * p + 1, (B, 2), generator=g)
            H, W = x.shape[-2:]
            x = torch.stack(
                [padded[i, :, oy : oy + H, ox : ox + W] for i, (oy, ox) in enumerate(off.tolist())]
            )
        if a.flip:
            flip = torch.rand(B, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def file(self, path: Path, train: bool, seed: int) -> torch.Tensor:
        """One image file -> uint8 ``(C, height, width)`` (before normalisation)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                return self._file(im, train, seed)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise DataError(
                f"{path}: not a readable image ({type(e).__name__}: {e}); remove or "
                "replace the file"
            ) from None

    def _file(self, im, train: bool, seed: int) -> torch.Tensor:
        from PIL import Image

        im = im.convert("L" if self.channels == 1 else "RGB")
        rng = random.Random(seed)
        if train and self.augment.resized_crop:
            im = _random_resized_crop(im, self.height, self.width, rng)
        else:
            im = _resize_center_crop(im, self.height, self.width)
        if train and self.augment.flip and rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x.shape[1])
        return (x.float().div_(255.0) - mean) / std


_LUMA = (0.299, 0.587, 0.114)


def _resize_center_crop(im, H: int, W: int):
    from PIL import Image

    # The usual evaluation transform: resize the short side to size / 0.875, crop the centre.
    w, h = im.size
    scale = max(H, W) / 0.875 / min(w, h)
    nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - W) // 2, (nh - H) // 2
    return im.crop((left, top, left + W, top + H))


def _random_resized_crop(im, H: int, W: int, rng: random.Random):
    from PIL import Image

    w, h = im.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return im.resize(
                (W, H), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch)
            )
    return _resize_center_crop(im, H, W)
