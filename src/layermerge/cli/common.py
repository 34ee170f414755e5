"""What the commands share: the user error, the MODEL arguments and how a model is
loaded and traced from them, and the scaffold of the commands that train, evaluate or
sample (device, process group, task, data, one JSON object or one line at the end).

Command modules import from here, never from :mod:`layermerge.cli` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data import DataError, DataSplits, Split
from ..diffusion import DiffusionTask, NoiseSchedule
from ..distributed import DistInfo
from ..models import LoadedModel, load_model
from ..plan import Plan
from ..tables import TableError
from ..tasks import ClassificationTask, Task
from ..trace import TracedModel, trace
from ..train import TrainingError
from ..transform import MergeVerificationError, deploy_network


class UserError(Exception):
    """Something on the command line is wrong; the message says what to do."""


# ------------------------------------------------------------------------ MODEL arguments


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and the flags that say how to load and trace it."""
    p.add_argument(
        "model",
        metavar="MODEL",
        help="torchvision:NAME, timm:NAME, layermerge:NAME, diffusers:NAME|DIR or "
        "path/to/file.py:factory",
    )
    p.add_argument("--model-kwargs", default=None, help="JSON object passed to the constructor")
    p.add_argument("--weights", default=None, help="state dict (.pt/.pth) or .safetensors file")
    p.add_argument(
        "--init-seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the model's initialisation when no --weights are given (default 0, "
        "or the command's --seed where it has one): the same seed gives the same search "
        "space; kept convs are meant to be chosen on trained weights",
    )
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default per family)")
    p.add_argument("--include-stem", action="store_true", help="bring the stem conv into the chain")
    p.add_argument("--include-head", action="store_true", help="bring the 1x1 head conv in")
    p.add_argument(
        "--freeze",
        action="append",
        default=[],
        metavar="MODULE",
        help="module path of a conv to keep (irreducible); repeatable",
    )


def load(args, *, weights: bool = True, seed: int = 0) -> LoadedModel:
    """MODEL with its flags (and --weights unless ``weights`` is false), initialised
    with torch seeded with --init-seed when given, else ``seed``."""
    init_seed = getattr(args, "init_seed", None)
    return load_model(
        args.model,
        args.model_kwargs,
        args.weights if weights else None,
        args.input_shape,
        seed=seed if init_seed is None else init_seed,
    )


def trace_loaded(args, loaded: LoadedModel) -> TracedModel:
    """The chain of a loaded MODEL under --include-stem, --include-head and --freeze."""
    return trace(
        loaded.model,
        loaded.input_shape,
        include_stem=args.include_stem,
        include_head=args.include_head,
        freeze=args.freeze,
    )


def load_traced(args, *, weights: bool = True) -> tuple[LoadedModel, TracedModel]:
    """MODEL and its flags -> (loaded model, traced model)."""
    loaded = load(args, weights=weights)
    return loaded, trace_loaded(args, loaded)


def deploy(
    traced: TracedModel, plan: Plan | str | Path, train_weights=None, *, one_input: bool = False
) -> nn.Module:
    """:func:`layermerge.transform.deploy_network`, a merge that is not exact being a
    user error."""
    try:
        return deploy_network(traced, plan, train_weights, one_input=one_input)
    except MergeVerificationError as e:
        raise UserError(str(e)) from None


def load_network(args) -> tuple[LoadedModel, nn.Module]:
    """MODEL with --weights or, with --plan, the deploy network of the plan whose
    fine-tuned train-time weights --weights holds (as written by finetune)."""
    if not getattr(args, "plan", None):
        loaded = load(args)
        return loaded, loaded.model
    loaded, traced = load_traced(args, weights=False)
    return loaded, deploy(traced, args.plan, args.weights)


def print_json(obj: Any) -> None:
    print(json.dumps(obj))


# ---------------------------------------------------------- data, task and run arguments


def add_data_args(p: argparse.ArgumentParser, holdout: bool = False) -> None:
    p.add_argument(
        "--data",
        default="fashion-mnist",
        metavar="SPEC",
        help="fashion-mnist[:PATH], mnist:PATH, kmnist:PATH, cifar10:PATH, cifar100:PATH or "
        "imagefolder:PATH (default: fashion-mnist from /usr/share/datasets/fashion-mnist)",
    )
    if holdout:
        p.add_argument(
            "--holdout-per-class",
            type=int,
            default=50,
            metavar="N",
            help="images per class in holdout-train and in holdout-val (default 50)",
        )
        p.add_argument(
            "--split-seed", type=int, default=0, help="seed of the holdout draw (default 0)"
        )


def add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        choices=["classification", "diffusion"],
        default="classification",
        help="classification (cross-entropy, accuracy) or diffusion (denoising loss of a "
        "denoiser called as model(x, t), e.g. a diffusers UNet; images scaled to [-1, 1]; "
        "default classification)",
    )
    add_schedule_args(g)
    g.add_argument(
        "--eval-draws",
        type=int,
        default=1,
        metavar="K",
        help="diffusion: fixed (noise, timestep) draws per image in evaluation (default 1)",
    )
    g.add_argument(
        "--eval-seed", type=int, default=0, help="diffusion: seed of the evaluation noise"
    )


def add_schedule_args(g) -> None:
    g.add_argument(
        "--num-train-timesteps", type=int, default=1000, metavar="T", help="diffusion: T (1000)"
    )
    g.add_argument("--beta-start", type=float, default=1e-4, help="diffusion: first beta")
    g.add_argument("--beta-end", type=float, default=0.02, help="diffusion: last beta")
    g.add_argument(
        "--beta-schedule",
        choices=["linear", "scaled_linear", "squaredcos_cap_v2"],
        default="linear",
        help="diffusion: beta schedule (default linear, as DDPM)",
    )


def schedule(args) -> NoiseSchedule:
    try:
        return NoiseSchedule(
            num_train_timesteps=args.num_train_timesteps,
            beta_start=args.beta_start,
            beta_end=args.beta_end,
            beta_schedule=args.beta_schedule,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--workers", type=int, default=0, help="data loading processes for image folders"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def make_task(args) -> Task:
    """The task of --task with its flags (classification when the command has none)."""
    try:
        if getattr(args, "task", "classification") == "diffusion":
            return DiffusionTask(
                schedule(args),
                distill_weight=getattr(args, "distill_weight", 0.0),
                eval_seed=args.eval_seed,
                eval_draws=args.eval_draws,
            )
        return ClassificationTask(
            label_smoothing=getattr(args, "label_smoothing", 0.0),
            distill_weight=getattr(args, "distill_weight", 0.0),
            distill_temperature=getattr(args, "distill_temperature", 4.0),
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def score(metrics: dict[str, float]) -> str:
    """Accuracy when the task has one, else the loss."""
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.2f}%"
    return f"loss {metrics['loss']:.5f}"


# ------------------------------------------------------------------------------ session


@dataclass
class Prepared:
    """MODEL loaded (and traced), the task, and the data splits for its input shape."""

    loaded: LoadedModel
    traced: TracedModel | None
    task: Task
    splits: DataSplits


@dataclass
class Session:
    """A command that trains, evaluates or samples: its arguments, device and process
    group, and what every such command does with them."""

    args: argparse.Namespace
    device: torch.device
    dist: DistInfo

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def task(self) -> Task:
        return make_task(self.args)

    def splits(self, task: Task, input_shape) -> DataSplits:
        args = self.args
        return task.make_data(
            args.data,
            input_shape,
            holdout_per_class=getattr(args, "holdout_per_class", 50),
            seed=getattr(args, "split_seed", 0),
        )

    def prepare(self, *, traced: bool = False, weights: bool = True, seed: int = 0) -> Prepared:
        """Load MODEL (and trace it), make the task and its data."""
        loaded = load(self.args, weights=weights, seed=seed)
        tm = trace_loaded(self.args, loaded) if traced else None
        task = self.task()
        return Prepared(loaded, tm, task, self.splits(task, loaded.input_shape))

    def eval_split(self, splits: DataSplits) -> Split | None:
        """The split of --eval-split (None for 'none')."""
        name = self.args.eval_split
        return None if name == "none" else splits.split(name)

    def checkpoint(self) -> Path:
        """--checkpoint, or OUT.ckpt."""
        a = self.args
        return Path(a.checkpoint) if a.checkpoint else Path(str(a.out) + ".ckpt")

    def logger(self):
        """One line per epoch on the main process (None with --json)."""
        if self.args.json or not self.is_main:
            return None

        def log(rec: dict[str, Any]) -> None:
            parts = [f"epoch {rec['epoch']}", f"train loss {rec['train_loss']:.4f}"]
            for k, v in rec.items():
                if k.endswith("_accuracy"):
                    parts.append(f"{k.removesuffix('_accuracy')} acc {v:.2f}%")
                elif k.endswith("_loss") and k != "train_loss":
                    parts.append(f"{k.removesuffix('_loss')} loss {v:.4f}")
            parts.append(f"{rec['seconds']:.1f}s")
            print(", ".join(parts), flush=True)

        return log

    def emit(self, result: dict[str, Any], line: str) -> None:
        """The command's result on the main process: JSON with --json, else ``line``."""
        if not self.is_main:
            return
        if self.args.json:
            print_json(result)
        else:
            print(line)


@contextlib.contextmanager
def session(args) -> Iterator[Session]:
    """Threads, device, process group (torchrun); library errors about data, tables or
    training become one-line user errors."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = distributed.select_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e)) from None
    dist = distributed.init(device)
    try:
        yield Session(args, device, dist)
    except (DataError, TableError, TrainingError) as e:
        raise UserError(str(e)) from None
    finally:
        distributed.shutdown()
