"""What the commands share: the user error, the MODEL arguments and how a model is
loaded and traced from them, and the scaffold of the commands that train, evaluate or
sample (device, process group, task, data, one JSON object or one line at the end).

Command modules import from here, never from :mod:`layermerge.cli` itself.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..data import DataSplits, Split
from ..diffusion import DiffusionTask, NoiseSchedule
from ..distributed import DistInfo
from ..fileio import atomic_write_text
from ..models import LoadedModel, load_model
from ..plan import Plan
from ..tasks import ClassificationTask, Task
from ..trace import TracedModel, trace
from ..transform import MergeVerificationError, deploy_network


class UserError(Exception):
    """A failure the user can act on; the message names what is wrong and what to do.

    ``exit_code`` is 1: the command line was valid but the work failed (a file that
    cannot be read or written, inconsistent inputs, ...). ``hint`` (optional) is the
    next step, shown in the JSON error object of ``--json``."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(UserError):
    """The command line (a flag, a value, a name) is wrong: exit status 2."""

    exit_code = 2


# --------------------------------------------------------------- argument value types


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    v = _float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return v


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    v = _float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return v


def deprecated_alias(p, old: str, new: str, **kwargs: Any) -> None:
    """``old`` keeps working as ``new`` (same ``dest``, ``type``, ...: ``kwargs``) and
    says on stderr that it is deprecated; ``--help`` shows ``new`` only."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(
                f"layermerge: warning: {old} is deprecated and will be removed; use {new}",
                file=sys.stderr,
            )
            setattr(namespace, self.dest, values)

    p.add_argument(old, action=Alias, help=argparse.SUPPRESS, **kwargs)


def device_arg(text: str) -> str:
    """argparse type: cpu, cuda, cuda:N (or any device torch knows, e.g. mps)."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}: use cpu, cuda or cuda:N"
        ) from None
    return text


def default_device(requested: str | None) -> str:
    """``requested``, or cuda when torch sees a GPU, else cpu."""
    if requested not in (None, "auto"):
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


#: argument names of the files commands write, and of the directories they write in
OUTPUT_FILES = (
    "out",
    "checkpoint",
    "conv_out",
    "options_csv",
    "chain_json",
    "frontier",
    "plot",
    "save_tensor",
)
OUTPUT_DIRS = ("out_dir", "run_dir")


def check_output_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output file that is a directory, or an output
    whose path runs through a file (it could never be written)."""
    for name in OUTPUT_FILES + OUTPUT_DIRS:
        value = getattr(args, name, None)
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        flag = "--" + name.replace("_", "-")
        path = Path(value)
        if name in OUTPUT_FILES and path.is_dir():
            raise UsageError(f"{flag} {path} is a directory: give a file path")
        if name in OUTPUT_DIRS and path.exists() and not path.is_dir():
            raise UsageError(f"{flag} {path} is a file: give a directory")
        for parent in path.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise UsageError(
                        f"{flag} {path} cannot be written: {parent} is a file, not a directory"
                    )
                break


#: argument names of the files commands read
INPUT_FILES = (
    "weights",
    "train_weights",
    "plan",
    "latency",
    "importance",
    "conv_importance",
    "images",
    "classifier_weights",
)


def check_input_paths(args: argparse.Namespace) -> None:
    """Refuse, before any work, an input file that does not exist."""
    for name in INPUT_FILES:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, (str, Path)) and str(v) and not Path(v).exists():
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} {v} does not exist", hint="check the path")


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary path (same directory and suffix) to write ``path`` through: moved
    into place when the block ends, removed when it fails, so a failed write leaves
    neither a partial nor an empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory, so a
    failed write (full or read-only disk) leaves neither a partial nor an empty file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(path))
    return atomic_write_text(path, text)


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
        type=nonnegative_int,
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
            type=positive_int,
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
        type=positive_int,
        default=1,
        metavar="K",
        help="diffusion: fixed (noise, timestep) draws per image in evaluation (default 1)",
    )
    g.add_argument(
        "--eval-seed", type=int, default=0, help="diffusion: seed of the evaluation noise"
    )


def add_schedule_args(g) -> None:
    g.add_argument(
        "--num-train-timesteps",
        type=positive_int,
        default=1000,
        metavar="T",
        help="diffusion: T (1000)",
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
        raise UsageError(str(e)) from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        type=device_arg,
        default=None,
        help="cpu, cuda, cuda:N (default: cuda if available)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--workers",
        type=nonnegative_int,
        default=0,
        help="data loading processes for image folders",
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
        raise UsageError(str(e)) from None


def score(metrics: dict[str, float]) -> str:
    """Accuracy when the task has one, else the loss."""
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.2f}%"
    return f"loss {metrics['loss']:.5f}"


def check_classes(
    loaded: LoadedModel, task: Task, splits: DataSplits, split: str = "train", model=None
) -> None:
    """Refuse a classifier (``model``, default the loaded one) with fewer outputs than
    the labels of ``split`` need (a label beyond its outputs would stop the run at
    the first batch that holds one)."""
    if not isinstance(task, ClassificationTask):
        return
    labels = splits.split(split).labels
    if not len(labels):
        return
    top = int(labels.max())
    model = loaded.model if model is None else model
    p = next(model.parameters(), None)
    x = torch.zeros(1, *loaded.input_shape, dtype=p.dtype if p is not None else None)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as e:
        if "allocate" in str(e):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(
            f"{loaded.spec} does not run on an input of shape {tuple(x.shape)}: {first}",
            hint="give the C,H,W of one input with --input-shape",
        ) from e
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] <= top:
        n = max(top + 1, splits.dataset.num_classes)
        raise UsageError(
            f"{loaded.spec} has {out.shape[1]} outputs but the {split} labels of "
            f"{splits.dataset.spec} go up to {top}: build it with {n} outputs, e.g. "
            f"--model-kwargs '{{\"num_classes\": {n}}}'"
        )


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
        splits = self.splits(task, loaded.input_shape)
        check_classes(loaded, task, splits)
        return Prepared(loaded, tm, task, splits)

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
    """Threads, device and process group (torchrun); a device torch cannot use is a
    usage error. Library errors reach :func:`layermerge.cli.main`, which prints them
    as one line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = distributed.select_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(str(e), hint="use --device cpu, or a device torch sees") from None
    dist = distributed.init(device)
    try:
        yield Session(args, device, dist)
    finally:
        distributed.shutdown()
