"""Diffusion models as a :class:`~layermerge.tasks.Task`, and sampling from them.

:class:`DiffusionTask` plugs a denoising UNet (``model(x, t)`` returning a tensor or
an object with ``.sample``, e.g. diffusers ``UNet2DModel``) into the same training
and importance code as classification:

- data: images only (labels are ignored), scaled to [-1, 1]; Fashion-MNIST's 28x28
  images are zero-padded (black, i.e. -1) to the model's 32x32; training
  augmentation is horizontal flips only (when the dataset allows flips), no shifts;
- training loss: epsilon prediction, ``|| eps - eps_theta(sqrt(a_t) x + sqrt(1 - a_t)
  eps, t) ||^2`` averaged over pixels, ``t`` uniform in ``[0, T)`` and the noised
  input made by diffusers' :class:`~diffusers.DDPMScheduler` (DDPM linear betas
  1e-4..0.02 over 1000 steps unless told otherwise); with a teacher and
  ``distill_weight`` w > 0: ``(1 - w) * MSE(eps_theta, eps) + w * MSE(eps_theta,
  eps_teacher)`` on the same noised input;
- evaluation: the same loss with noise and timesteps fixed per *image*: each image's
  generator is seeded from a SHA-256 of ``eval_seed`` and the image's pixels (as
  uint8), so the holdout loss does not depend on batch order, batch size, the rank
  an image lands on or the device. ``eval_draws`` k > 1 averages k draws per image
  with stratified timesteps ``t_j = floor((j + u_j) T / k)`` (lower variance);
- importance (the paper's denoising-loss ratio): ``importance = exp(-(L - L_base) / L_base)`` with ``L`` the
  holdout-val loss of the compressed, fine-tuned network and ``L_base`` that of the
  unmodified one.

:func:`sample` runs a UNet inside diffusers' :class:`~diffusers.DDIMPipeline` with a
:class:`~diffusers.DDIMScheduler` of the same noise schedule.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .data import Augment, DataSpec, DataSplits, make_splits, open_dataset
from .tasks import Task

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
#: images in [-1, 1]: (x / 255 - 0.5) / 0.5
SYMMETRIC_SCALE = ((0.5,), (0.5,))


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise ImportError(
            "diffusion models need the diffusers package: pip install 'layermerge[diffusion]'"
        ) from None
    return diffusers


@dataclass(frozen=True)
class NoiseSchedule:
    """The forward process: ``num_train_timesteps`` betas from ``beta_start`` to
    ``beta_end`` (DDPM, Ho et al. 2020: linear 1e-4..0.02 over 1000 steps)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"need at least 2 timesteps, got {self.num_train_timesteps}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(
                f"need 0 < beta_start <= beta_end < 1 (got {self.beta_start}, {self.beta_end})"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def ddpm_scheduler(self):
        """diffusers' :class:`~diffusers.DDPMScheduler` of this schedule (training noise)."""
        return _diffusers().DDPMScheduler(**self.to_dict())

    def ddim_scheduler(self, *, clip_sample: bool = True):
        """diffusers' :class:`~diffusers.DDIMScheduler` of this schedule (sampling)."""
        return _diffusers().DDIMScheduler(**self.to_dict(), clip_sample=clip_sample)


def predict_noise(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``model(x, t)`` as a float tensor, whether it returns a tensor, a diffusers output
    (``.sample``) or a tuple."""
    out = model(x, t)
    if hasattr(out, "sample"):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.float()


def image_seed(seed: int, image: torch.Tensor) -> int:
    """A 63-bit seed from ``seed`` and one image's content (``image`` in [-1, 1],
    quantised to uint8 so float noise in the data pipeline does not change it)."""
    q = ((image.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    h = hashlib.sha256(f"{int(seed)}|{tuple(q.shape)}|".encode())
    h.update(q.contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


class DiffusionTask(Task):
    """Denoising (epsilon-prediction) loss of a UNet; importance from the holdout-val
    loss ratio (see the module docstring)."""

    name = "diffusion"
    importance_columns = ("loss_ratio", "delta_loss", "val_loss", "train_loss")
    importance_scores = ("loss_ratio",)

    def __init__(
        self,
        schedule: NoiseSchedule | None = None,
        *,
        distill_weight: float = 0.0,
        eval_seed: int = 0,
        eval_draws: int = 1,
        flip: bool | None = None,
    ) -> None:
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"the distillation weight must be in [0, 1], got {distill_weight}")
        if eval_draws < 1:
            raise ValueError(f"eval_draws must be >= 1, got {eval_draws}")
        self.schedule = schedule or NoiseSchedule()
        self.distill_weight = distill_weight
        self.eval_seed = eval_seed
        self.eval_draws = eval_draws
        self.flip = flip
        self._scheduler = self.schedule.ddpm_scheduler()

    def settings(self) -> dict[str, Any]:
        return {
            "task": self.name,
            **{f"noise_{k}": v for k, v in self.schedule.to_dict().items()},
            "prediction": "epsilon",
            "data_range": "[-1, 1]",
            "distill_weight": self.distill_weight,
            "eval_seed": self.eval_seed,
            "eval_draws": self.eval_draws,
            "flip": self.flip,
        }

    def make_data(self, spec, input_shape, *, holdout_per_class=50, seed=0) -> DataSplits:
        dataset = open_dataset(spec) if isinstance(spec, (str, DataSpec)) else spec
        flip = dataset.augment.flip if self.flip is None else self.flip
        return make_splits(
            dataset,
            input_shape,
            holdout_per_class=holdout_per_class,
            seed=seed,
            normalization=SYMMETRIC_SCALE,
            augment=Augment(flip=flip),
        )

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) x + sqrt(1 - a_t) noise`` (diffusers' DDPMScheduler.add_noise)."""
        return self._scheduler.add_noise(x, noise, t)

    def _losses(self, model, x, noise, t, teacher=None) -> torch.Tensor:
        noisy = self.add_noise(x, noise, t)
        eps = predict_noise(model, noisy, t)
        per_sample = (eps - noise.float()).pow(2).flatten(1).mean(1)
        if teacher is None or self.distill_weight == 0.0:
            return per_sample
        with torch.no_grad():
            target = predict_noise(teacher, noisy, t)
        kd = (eps - target).pow(2).flatten(1).mean(1)
        return (1.0 - self.distill_weight) * per_sample + self.distill_weight * kd

    def training_loss(self, model, batch, *, teacher=None) -> torch.Tensor:
        # The global generator: fit() reseeds it at every epoch, so resuming reproduces it.
        x = batch[0]
        noise = torch.randn_like(x)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x.shape[0],), device=x.device)
        return self._losses(model, x, noise, t, teacher).mean()

    def evaluation_noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise ``(k, B, C, H, W)`` and timesteps ``(k, B)`` of the ``k = eval_draws``
        fixed draws of each image of ``x`` (on the CPU)."""
        k, T = self.eval_draws, self.schedule.num_train_timesteps
        noises, steps = [], []
        for img in x:
            g = torch.Generator().manual_seed(image_seed(self.eval_seed, img))
            u = torch.rand(k, generator=g, dtype=torch.float64)
            strata = torch.arange(k, dtype=torch.float64)
            steps.append(((strata + u) * T / k).floor().long().clamp_(0, T - 1))
            noises.append(torch.randn((k, *img.shape), generator=g))
        return torch.stack(noises, 1), torch.stack(steps, 1)

    def evaluation_sums(self, model, batch) -> torch.Tensor:
        x = batch[0]
        noise, steps = self.evaluation_noise(x)
        total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for j in range(self.eval_draws):
            n, t = noise[j].to(x.device, x.dtype), steps[j].to(x.device)
            total += self._losses(model, x, n, t).double()
        loss = (total / self.eval_draws).sum().cpu()
        return torch.stack([loss, torch.tensor(float(x.shape[0]), dtype=torch.float64)])

    def metrics(self, sums) -> dict[str, float]:
        loss, count = (float(v) for v in sums)
        if count == 0:
            raise ValueError("no samples were evaluated")
        return {"loss": loss / count}

    def importance_values(self, base, measured, score=None) -> dict[str, float]:
        if score not in (None, "loss_ratio"):
            raise ValueError(f"the diffusion task scores by loss_ratio only, not {score!r}")
        base_loss, loss = base["val"]["loss"], measured["val"]["loss"]
        if not base_loss > 0:
            raise ValueError(f"the base holdout-val loss must be > 0, got {base_loss}")
        ratio = (loss - base_loss) / base_loss
        return {
            "importance": math.exp(-ratio),
            "loss_ratio": ratio,
            "delta_loss": loss - base_loss,
            "val_loss": loss,
            "train_loss": measured["train"]["loss"],
        }


# ---------------------------------------------------------------------------
# sampling


class _PipelineUNet(nn.Module):
    """What DDIMPipeline needs of its ``unet`` (``config.sample_size``/``in_channels``,
    ``dtype``, ``device``, ``.sample`` outputs) around any ``model(x, t)``."""

    def __init__(self, model: nn.Module, sample_shape: tuple[int, int, int]) -> None:
        from types import SimpleNamespace

        super().__init__()
        self.model = model
        c, h, w = sample_shape
        self.config = SimpleNamespace(in_channels=c, sample_size=h if h == w else (h, w))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, x, t):
        from types import SimpleNamespace

        if t.dim() == 0:
            t = t.expand(x.shape[0])
        return SimpleNamespace(sample=predict_noise(self.model, x, t).to(x.dtype))


def _sample_shape(unet: nn.Module, sample_shape) -> tuple[int, int, int]:
    if sample_shape is not None:
        return tuple(int(v) for v in sample_shape)
    cfg = getattr(unet, "config", None)
    if cfg is None or not hasattr(cfg, "sample_size") or not hasattr(cfg, "in_channels"):
        raise ValueError(
            f"{type(unet).__name__} has no diffusers config: pass sample_shape=(C, H, W)"
        )
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    return int(cfg.in_channels), int(h), int(w)


def _mix(*parts: int) -> int:
    from .data import _mix as mix

    return mix(*parts)


@torch.no_grad()
def sample(
    unet: nn.Module,
    n: int,
    *,
    steps: int = 100,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 100,
    schedule: NoiseSchedule | None = None,
    clip_sample: bool = True,
    sample_shape: tuple[int, int, int] | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``n`` images in [-1, 1] (float32 ``(n, C, H, W)`` on the CPU) from ``unet`` by
    DDIM with ``steps`` steps (``eta`` 0: deterministic DDIM, 1: DDPM-like).

    Runs diffusers' ``DDIMPipeline`` with a ``DDIMScheduler`` of ``schedule`` (the
    task's, DDPM linear by default). Image ``i`` draws all its noise from its own CPU
    generator seeded by ``(seed, i)``, so an image does not depend on ``batch_size``
    or the device it is sampled on (up to float rounding). ``unet`` is a diffusers
    ``UNet2DModel`` or any ``model(x, t)`` (then give ``sample_shape`` unless it has
    a diffusers-like ``config``).
    """
    diffusers = _diffusers()
    if n < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"need n, batch_size and steps >= 1 (got {n}, {batch_size}, {steps})")
    schedule = schedule or NoiseSchedule()
    if steps > schedule.num_train_timesteps:
        raise ValueError(f"steps ({steps}) exceeds the {schedule.num_train_timesteps} timesteps")
    shape = _sample_shape(unet, sample_shape)
    was_training = unet.training
    if device is not None:
        unet.to(device)
    unet.eval()
    model = unet
    if not isinstance(unet, diffusers.UNet2DModel):
        model = _PipelineUNet(unet, shape)
    pipe = diffusers.DDIMPipeline(
        unet=model, scheduler=schedule.ddim_scheduler(clip_sample=clip_sample)
    )
    pipe.set_progress_bar_config(disable=True)
    from tqdm import tqdm

    out = []
    try:
        with tqdm(total=n, desc="sample", unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, n, batch_size):
                idx = range(start, min(n, start + batch_size))
                gens = [torch.Generator().manual_seed(_mix(seed, i)) for i in idx]
                images = pipe(
                    batch_size=len(idx),
                    generator=gens,
                    eta=eta,
                    num_inference_steps=steps,
                    output_type="pt",
                ).images
                # the pipeline returns (x / 2 + 0.5) clamped to [0, 1]
                out.append(images.float().cpu() * 2.0 - 1.0)
                bar.update(len(idx))
    finally:
        unet.train(was_training)
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (the rounding of saved images)."""
    return ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2):
    """A PIL image of ``images`` in [-1, 1] (N, C, H, W) laid out ``nrow`` per row."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + pad) + pad, nrow * (w + pad) + pad, dtype=torch.uint8)
    u8 = to_uint8(images)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[:, y : y + h, x : x + w] = u8[i]
    arr = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if c == 1 else arr)


__all__ = [
    "DiffusionTask",
    "NoiseSchedule",
    "image_grid",
    "image_seed",
    "predict_noise",
    "sample",
    "to_uint8",
]
