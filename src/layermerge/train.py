"""Training and fine-tuning: one loop for the base network, a plan's train-time
network and the short fine-tunes of importance measurement.

:func:`fit` trains any ``nn.Module`` on a :class:`~layermerge.data.Split` for a
:class:`Recipe` (SGD with Nesterov momentum or AdamW, linear warm-up then cosine
decay per step, weight decay, label smoothing and distillation through the task,
gradient clipping, mixed precision on CUDA, optionally an exponential moving average
of the weights). With a checkpoint path it saves a
checkpoint after every epoch and resumes from it: data order and augmentation
depend only on ``(seed, epoch)``, so a resumed run computes what the
uninterrupted one would have. Under ``torchrun`` the model is wrapped in
DistributedDataParallel and each rank trains on its
:class:`~torch.utils.data.DistributedSampler` share; ``batch_size`` is the
global batch (divided among ranks).

Weights are saved as plain state dicts (``torch.save``, read back with
``torch.load(weights_only=True)``, or ``.safetensors``). A fine-tuned plan is
saved as the state dict of its train-time network; :func:`load_train_net` puts
it back: original model + plan -> :func:`layermerge.apply` -> load the weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Split
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_buffers, from_env
from .tasks import Task
from .transform import load_train_net  # noqa: F401  (its home is transform)

OPTIMIZERS = ("sgd", "adamw")
CHECKPOINT_SCHEMA = 1


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, or a checkpoint that does not fit)."""


@dataclass
class Recipe:
    """How to train. ``steps`` (when given) overrides ``epochs``; ``epochs`` may be
    fractional. ``batch_size`` is global: each of ``world`` ranks takes its share."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    #: linear warm-up in optimizer steps (overrides ``warmup_epochs`` when > 0)
    warmup_steps: int = 0
    grad_clip: float | None = None
    amp: bool = True
    seed: int = 0
    eval_batch_size: int = 500
    augment: bool = True
    #: EMA of the weights (0: off). When on, the average is evaluated, checkpointed
    #: and left in the model at the end; see :class:`WeightEMA` (with warm-up).
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"need 0 <= min_lr <= lr and lr > 0 (lr={self.lr}, min_lr={self.min_lr})"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.warmup_epochs < 0:
            raise ValueError(
                f"warm-up must be >= 0 (warmup_steps={self.warmup_steps}, "
                f"warmup_epochs={self.warmup_epochs})"
            )

    def to_dict(self) -> dict[str, Any]:
        # Fields added later are left out while off, so checkpoints and importance
        # tables written before them still match (and resume).
        d = asdict(self)
        for k in ("ema_decay", "warmup_steps"):
            if not d[k]:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def total_steps(self, steps_per_epoch: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * steps_per_epoch))

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        """Linear warm-up to ``lr``, then cosine from ``lr`` towards ``min_lr``."""
        warm = self.warmup_steps or round(self.warmup_epochs * steps_per_epoch)
        warm = min(warm, total - 1)
        if step < warm:
            return self.lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


#: The reference's importance fine-tune: one epoch, SGD lr 0.1, momentum 0.9, Nesterov,
#: weight decay 1e-5, cosine to 0, batch 256 (also the CLI's defaults).
IMPORTANCE_RECIPE: dict[str, Any] = {
    "epochs": 1.0,
    "batch_size": 256,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 1e-5,
    "warmup_epochs": 0.0,
    "min_lr": 0.0,
}


def importance_recipe(**overrides: Any) -> Recipe:
    """:data:`IMPORTANCE_RECIPE` with ``overrides`` (``None`` values ignored)."""
    base = dict(IMPORTANCE_RECIPE)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe(**base)


# ---------------------------------------------------------------------------
# state dicts


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
        raise


def save_state_dict(model: nn.Module, path: str | Path) -> Path:
    """Save ``model``'s state dict: ``.safetensors`` by suffix, else ``torch.save``."""
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            save_file(sd, str(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path
    _atomic_torch_save(sd, path)
    return path


# ---------------------------------------------------------------------------
# the loop


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _progress(total: int, desc: str, enabled: bool, **kw):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=False,
        **kw,
    )


def _autocast(device: torch.device, enabled: bool):
    if not (enabled and device.type == "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov and recipe.momentum > 0,
            weight_decay=recipe.weight_decay,
        )
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: Task,
    split: Split,
    *,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    dist: DistInfo | None = None,
    progress: bool = False,
    desc: str = "eval",
    amp: bool = False,
) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode) on ``split``, over all ranks.
    ``amp``: evaluate in reduced precision on CUDA (off: importance deltas are small)."""
    dist = dist or from_env()
    device = torch.device(device) if device is not None else _param_device(model)
    was_training = model.training
    model.eval()
    sums = None
    n = split.num_batches(batch_size, train=False, rank=dist.rank, world=dist.world)
    with _progress(n, desc, progress and dist.is_main) as bar:
        for x, y in split.batches(batch_size, train=False, rank=dist.rank, world=dist.world):
            with _autocast(device, amp):
                s = task.evaluation_sums(model, (x.to(device), y.to(device))).cpu()
            sums = s if sums is None else sums + s
            bar.update()
    if sums is None:
        raise TrainingError(f"the {split.name} split gave no batches to evaluate")
    model.train(was_training)
    return task.metrics(all_reduce_sum(sums, dist))


def _param_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _mix(*parts: int) -> int:
    from .data import _mix as mix

    return mix(*parts)


class WeightEMA:
    """An exponential moving average of a model's weights, kept in a copy of the model.

    After optimizer step ``n`` (counting from 1) each floating-point parameter moves
    ``p_ema <- d p_ema + (1 - d) p`` with ``d = min(decay, n / (n + 9))``: the warm-up
    lets the average follow the fast early changes (the average starts as the
    initial weights). Buffers (BatchNorm statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.decay = decay
        self.model = copy.deepcopy(_unwrap(model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def rate(self, step: int) -> float:
        """The decay used for the update after optimizer step ``step`` (from 1)."""
        return min(self.decay, step / (step + 9.0))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        model = _unwrap(model)
        for e, p in zip(self.model.parameters(), model.parameters(), strict=True):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), 1.0 - d)
            else:
                e.copy_(p)
        for e, b in zip(self.model.buffers(), model.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    steps: int
    resumed_from_epoch: int


def fit(
    model: nn.Module,
    task: Task,
    train_split: Split,
    recipe: Recipe,
    *,
    eval_split: Split | None = None,
    teacher: nn.Module | None = None,
    device: torch.device | str | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = True,
    dist: DistInfo | None = None,
    progress: bool = True,
    desc: str = "train",
    log: Callable[[dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 0,
) -> FitResult:
    """Train ``model`` in place for ``recipe`` on ``train_split``.

    ``eval_split``: evaluated after every epoch (metrics in the history).
    ``teacher``: the uncompressed network for distillation (used when the task
    distils). ``checkpoint``: written after every epoch and, with ``resume``,
    continued from when it exists (refused if made with another recipe).
    ``log`` receives each epoch's record; ``on_epoch_end`` too, after the
    checkpoint is written (raising there stops training, e.g. in tests).
    With ``recipe.ema_decay`` > 0 the weight average (:class:`WeightEMA`) is what is
    evaluated, and it is copied into ``model`` when training ends.
    """
    dist = dist or from_env()
    device = torch.device(device) if device is not None else _param_device(model)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    per_rank = max(1, recipe.batch_size // dist.world)
    spe = train_split.num_batches(per_rank, train=True, rank=dist.rank, world=dist.world)
    if spe == 0:
        raise TrainingError(f"the {train_split.name} split is empty")
    total = recipe.total_steps(spe)
    n_epochs = math.ceil(total / spe)

    optimizer = make_optimizer(model, recipe)
    use_scaler = recipe.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    start_epoch, step, history = 0, 0, []
    ema = WeightEMA(model, recipe.ema_decay) if recipe.ema_decay > 0 else None
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and resume and ckpt.exists():
        state = _load_checkpoint(ckpt, recipe)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if "ema" not in state:
                raise TrainingError(f"the checkpoint {ckpt} holds no weight average (EMA)")
            ema.model.load_state_dict(state["ema"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        history = json.loads(state["history"])
    resumed_from = start_epoch

    net: nn.Module = model
    if dist.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    for epoch in range(start_epoch, n_epochs):
        t0 = time.time()
        net.train()
        # Anything else random in the model (dropout, stochastic depth) restarts from
        # a seed of the epoch too, so resuming reproduces it.
        torch.manual_seed(_mix(recipe.seed, epoch, dist.rank, 1))
        steps_now = min(spe, total - step)
        loss_sum = torch.zeros((), dtype=torch.float64)
        lr = recipe.lr
        bar = _progress(
            steps_now, f"{desc} {epoch + 1}/{n_epochs}", progress and dist.is_main, unit="step"
        )
        batches = train_split.batches(
            per_rank,
            train=True,
            seed=recipe.seed,
            epoch=epoch,
            rank=dist.rank,
            world=dist.world,
            workers=workers,
            augment=recipe.augment,
        )
        for i, (x, y) in enumerate(batches):
            if i >= steps_now:
                break
            lr = recipe.lr_at(step, total, spe)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device, recipe.amp):
                loss = task.training_loss(net, (x, y), teacher=teacher)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at step {step + 1} (lr {lr:.3g}); "
                    "lower the learning rate or enable --grad-clip"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            if ema is not None:
                ema.update(model, step)
            loss_sum += loss.detach().double().cpu()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}", refresh=False)
        bar.close()
        mean_loss = all_reduce_sum(loss_sum, dist).item() / (steps_now * dist.world)
        # Each rank updated its BatchNorm statistics on its own last batch; evaluate
        # and save rank 0's, as DDP would use at the next forward.
        broadcast_buffers(model, dist)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr,
            "train_loss": mean_loss,
        }
        if eval_split is not None:
            m = evaluate(
                model if ema is None else ema.model,
                task,
                eval_split,
                batch_size=recipe.eval_batch_size,
                device=device,
                dist=dist,
                progress=progress,
                desc=f"eval {eval_split.name}",
            )
            record.update({f"{eval_split.name}_{k}": v for k, v in m.items()})
        record["seconds"] = round(time.time() - t0, 3)
        history.append(record)
        if ckpt is not None:
            if dist.is_main:
                _save_checkpoint(
                    ckpt, model, optimizer, scaler, epoch + 1, step, recipe, history, ema
                )
            barrier(dist)
        if log is not None and dist.is_main:
            log(record)
        if on_epoch_end is not None:
            on_epoch_end(record)
    if ema is not None:
        model.load_state_dict(ema.model.state_dict())
    model.eval()
    return FitResult(history=history, steps=step, resumed_from_epoch=resumed_from)


def _recipe_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)


def _save_checkpoint(path, model, optimizer, scaler, epoch, step, recipe, history, ema=None):
    state = {
        "schema": CHECKPOINT_SCHEMA,
        "model": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "recipe": _recipe_json(recipe),
        "history": json.dumps(history),
    }
    if scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state["ema"] = ema.state_dict()
    _atomic_torch_save(state, Path(path))


def _load_checkpoint(path: Path, recipe: Recipe) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(
            f"cannot read the checkpoint {path} ({e}); delete it to start over"
        ) from None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        raise TrainingError(f"{path} is not a layermerge training checkpoint; delete it or move it")
    if state["recipe"] != _recipe_json(recipe):
        old = json.loads(state["recipe"])
        diff = [
            f"{k}={old.get(k)!r} (now {v!r})"
            for k, v in recipe.to_dict().items()
            if old.get(k) != v
        ]
        raise TrainingError(
            f"the checkpoint {path} was made with another recipe: {', '.join(diff)}; use the "
            "same settings to resume, or delete the checkpoint to start over"
        )
    return state
