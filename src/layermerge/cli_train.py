"""``layermerge train | finetune | importance | evaluate``: the commands that need data.

Wired into :mod:`layermerge.cli` with :func:`register`. Each command works the
same as a single process or under ``torchrun`` (DDP for train/finetune, entries
sharded across ranks for importance).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from layermerge.cli import UserError, add_model_args
from layermerge.train import IMPORTANCE_RECIPE


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_finetune(subparsers)
    _register_importance(subparsers)
    _register_evaluate(subparsers)


# ----------------------------------------------------------------------------- arguments


def _add_data_args(p: argparse.ArgumentParser, holdout: bool = False) -> None:
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


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument(
        "--workers", type=int, default=0, help="data loading processes for image folders"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def _add_recipe_args(p: argparse.ArgumentParser, d: dict[str, Any], importance: bool = False):
    g = p.add_argument_group("recipe")
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=float, default=None, help=f"epochs (default {d['epochs']:g})"
    )
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides)")
    g.add_argument("--batch-size", type=int, default=d["batch_size"], help="global batch size")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d["optimizer"])
    g.add_argument("--lr", type=float, default=d["lr"], help=f"peak learning rate ({d['lr']:g})")
    g.add_argument("--momentum", type=float, default=d["momentum"])
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=d["nesterov"],
        help="Nesterov momentum (SGD)",
    )
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    g.add_argument("--warmup-epochs", type=float, default=d["warmup_epochs"])
    g.add_argument("--min-lr", type=float, default=d["min_lr"], help="end of the cosine (0)")
    g.add_argument("--grad-clip", type=float, default=None, metavar="NORM")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="AMP on CUDA")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-batch-size", type=int, default=500)
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the dataset's training augmentation (shifts, flips, crops)",
    )
    if not importance:
        g.add_argument("--label-smoothing", type=float, default=d.get("label_smoothing", 0.0))


def _recipe(args, defaults: dict[str, Any]):
    from layermerge.train import Recipe

    try:
        return Recipe(
            epochs=args.epochs if args.epochs is not None else defaults["epochs"],
            steps=args.steps,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            lr=args.lr,
            momentum=args.momentum,
            nesterov=args.nesterov,
            weight_decay=args.weight_decay,
            warmup_epochs=args.warmup_epochs,
            min_lr=args.min_lr,
            grad_clip=args.grad_clip,
            amp=args.amp,
            seed=args.seed,
            eval_batch_size=args.eval_batch_size,
            augment=args.augment,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


TRAIN_DEFAULTS = {
    "epochs": 10.0,
    "batch_size": 128,
    "optimizer": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "nesterov": True,
    "weight_decay": 5e-4,
    "warmup_epochs": 0.0,
    "min_lr": 0.0,
}
FINETUNE_DEFAULTS = {**TRAIN_DEFAULTS, "epochs": 5.0, "lr": 0.01}
IMPORTANCE_DEFAULTS = IMPORTANCE_RECIPE  # the reference protocol (DESIGN §6)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _session(args):
    """Threads, device, process group; library errors become one-line user errors."""
    import torch

    from layermerge import distributed
    from layermerge.data import DataError
    from layermerge.tables import TableError
    from layermerge.train import TrainingError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = distributed.select_device(args.device)
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e)) from None
    dist = distributed.init(device)
    try:
        yield device, dist
    except (DataError, TableError, TrainingError) as e:
        raise UserError(str(e)) from None
    finally:
        distributed.shutdown()


def _load(args, *, weights: bool = True):
    from layermerge.models import load_model

    return load_model(
        args.model, args.model_kwargs, args.weights if weights else None, args.input_shape
    )


def _trace(args, model, input_shape):
    from layermerge.trace import trace

    return trace(
        model,
        input_shape,
        include_stem=args.include_stem,
        include_head=args.include_head,
        freeze=args.freeze,
    )


def _task(args):
    from layermerge.tasks import ClassificationTask

    try:
        return ClassificationTask(
            label_smoothing=getattr(args, "label_smoothing", 0.0),
            distill_weight=getattr(args, "distill_weight", 0.0),
            distill_temperature=getattr(args, "distill_temperature", 4.0),
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _splits(args, task, input_shape):
    return task.make_data(
        args.data,
        input_shape,
        holdout_per_class=getattr(args, "holdout_per_class", 50),
        seed=getattr(args, "split_seed", 0),
    )


def _eval_split(splits, name: str):
    if name == "none":
        return None
    return splits.split(name)


def _logger(args, dist):
    if args.json or not dist.is_main:
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


def _print_result(args, dist, result: dict[str, Any], line: str) -> None:
    if not dist.is_main:
        return
    if args.json:
        print(json.dumps(result))
    else:
        print(line)


def _checkpoint_path(args) -> Path:
    return Path(args.checkpoint) if args.checkpoint else Path(str(args.out) + ".ckpt")


# ----------------------------------------------------------------------------- train


def _register_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an unmodified network on a dataset",
        description=(
            "Train MODEL (from --weights or its initialisation) on the training split, "
            "evaluating after each epoch; checkpoints every epoch and resumes from it. "
            "Under torchrun: DistributedDataParallel."
        ),
    )
    add_model_args(p)
    _add_data_args(p)
    _add_recipe_args(p, TRAIN_DEFAULTS)
    p.add_argument("--out", required=True, metavar="W.pt", help="state dict (.pt or .safetensors)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--eval-split", choices=["test", "holdout-val", "none"], default="test", help="per epoch"
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import torch

    from layermerge.train import fit, save_state_dict

    recipe = _recipe(args, TRAIN_DEFAULTS)
    with _session(args) as (device, dist):
        # The initialisation comes from --seed too: a rerun (or every rank) starts alike.
        torch.manual_seed(recipe.seed)
        loaded = _load(args)
        task = _task(args)
        splits = _splits(args, task, loaded.input_shape)
        t0 = time.time()
        res = fit(
            loaded.model,
            task,
            splits.train,
            recipe,
            eval_split=_eval_split(splits, args.eval_split),
            device=device,
            checkpoint=_checkpoint_path(args),
            resume=not args.no_resume,
            dist=dist,
            progress=not args.no_progress,
            log=_logger(args, dist),
            workers=args.workers,
        )
        if dist.is_main:
            save_state_dict(loaded.model, args.out)
        last = res.history[-1] if res.history else {}
        result = {"out": str(args.out), "steps": res.steps, "seconds": time.time() - t0, **last}
        acc = next((v for k, v in last.items() if k.endswith("_accuracy")), None)
        _print_result(
            args,
            dist,
            result,
            f"trained {args.model} for {res.steps} steps"
            + (f" ({args.eval_split} accuracy {acc:.2f}%)" if acc is not None else "")
            + f"; weights written to {args.out}",
        )
    return 0


# ----------------------------------------------------------------------------- finetune


def _register_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the train-time network of a plan, then merge and verify it",
        description=(
            "Apply PLAN to MODEL with its trained --weights, fine-tune the train-time "
            "network (optionally distilling from the unmodified network), save its state "
            "dict to --out, then merge it into the deploy network, verify the merge and "
            "evaluate it. Load the result back with: the same MODEL + PLAN + `layermerge "
            "evaluate --plan PLAN --weights OUT` (library: layermerge.train.load_train_net)."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", required=True, metavar="plan.json")
    _add_data_args(p)
    _add_recipe_args(p, FINETUNE_DEFAULTS)
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of distillation from the unmodified network's logits (0: off)",
    )
    p.add_argument("--distill-temperature", type=float, default=4.0, metavar="T")
    p.add_argument("--out", required=True, metavar="W.pt", help="train-time network state dict")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--eval-split", choices=["test", "holdout-val", "none"], default="test", help="per epoch"
    )
    p.add_argument(
        "--eval-before",
        action="store_true",
        help="also evaluate the unmodified network and the plan's network before fine-tuning",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    import copy

    from layermerge.plan import Plan
    from layermerge.space import build_space
    from layermerge.train import evaluate, fit, save_state_dict
    from layermerge.transform import MergeVerificationError, apply, merge

    if args.weights is None:
        raise UserError("finetune needs the trained network's --weights")
    recipe = _recipe(args, FINETUNE_DEFAULTS)
    plan = Plan.load(args.plan)
    with _session(args) as (device, dist):
        loaded = _load(args)
        traced = _trace(args, loaded.model, loaded.input_shape)
        build_space(traced.chain).check_plan(plan)
        task = _task(args)
        splits = _splits(args, task, loaded.input_shape)
        eval_split = _eval_split(splits, args.eval_split)
        net = apply(traced, plan)
        teacher = copy.deepcopy(loaded.model) if args.distill_weight > 0 else None
        result: dict[str, Any] = {"plan": plan.summary(), "out": str(args.out)}
        if args.eval_before and eval_split is not None:
            for name, m in (("base", copy.deepcopy(loaded.model)), ("applied", net)):
                met = evaluate(
                    m.to(device),
                    task,
                    eval_split,
                    batch_size=recipe.eval_batch_size,
                    device=device,
                    dist=dist,
                )
                result.update({f"{name}_{k}": v for k, v in met.items()})
                if dist.is_main and not args.json:
                    print(f"{name}: {eval_split.name} accuracy {met.get('accuracy', 0):.2f}%")
        t0 = time.time()
        res = fit(
            net,
            task,
            splits.train,
            recipe,
            eval_split=eval_split,
            teacher=teacher,
            device=device,
            checkpoint=_checkpoint_path(args),
            resume=not args.no_resume,
            dist=dist,
            progress=not args.no_progress,
            log=_logger(args, dist),
            workers=args.workers,
        )
        if dist.is_main:
            save_state_dict(net, args.out)
        try:
            deploy = merge(net.cpu().float())
        except MergeVerificationError as e:
            raise UserError(f"the fine-tuned network did not merge exactly: {e}") from None
        result.update(steps=res.steps, seconds=time.time() - t0)
        if eval_split is not None:
            met = evaluate(
                deploy.to(device),
                task,
                eval_split,
                batch_size=recipe.eval_batch_size,
                device=device,
                dist=dist,
            )
            result.update({f"merged_{k}": v for k, v in met.items()})
        line = f"fine-tuned {plan.summary()}; train-time weights written to {args.out}"
        if "merged_accuracy" in result:
            line += f"; merged network (verified): {eval_split.name} accuracy "
            line += f"{result['merged_accuracy']:.2f}%"
        _print_result(args, dist, result, line)
    return 0


# ----------------------------------------------------------------------------- importance


def _register_importance(sub) -> None:
    p = sub.add_parser(
        "importance",
        help="build the importance table (and the per-conv table) of a trained network",
        description=(
            "For every option of the search space, apply its single-block plan to the "
            "trained network, fine-tune briefly on holdout-train and measure holdout-val; "
            "likewise with each reducible conv dropped (per-conv table for the layerprune "
            "baseline). Rows are written one by one: rerun the same command to resume. "
            "Under torchrun the entries are spread over the ranks."
        ),
    )
    add_model_args(p)
    _add_data_args(p, holdout=True)
    _add_recipe_args(p, IMPORTANCE_DEFAULTS, importance=True)
    p.add_argument("--out", required=True, metavar="I.csv", help="importance table")
    conv = p.add_mutually_exclusive_group()
    conv.add_argument(
        "--conv-out", default=None, metavar="C.csv", help="per-conv table (default I.conv.csv)"
    )
    conv.add_argument("--no-conv", action="store_true", help="skip the per-conv table")
    p.add_argument(
        "--reinit",
        choices=["single", "none"],
        default="single",
        help="re-initialise the conv of single-conv blocks before fine-tuning (reference) "
        "or keep its weights",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="stop after measuring N entries (resumable)"
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_importance)


def cmd_importance(args) -> int:
    from layermerge.importance import build_importance_tables
    from layermerge.models import parse_kwargs
    from layermerge.space import build_space
    from layermerge.trace import conv_weights

    if args.weights is None:
        print(
            "layermerge importance: warning: no --weights, measuring a randomly initialised "
            "network",
            file=sys.stderr,
        )
    recipe = _recipe(args, IMPORTANCE_DEFAULTS)
    with _session(args) as (device, dist):
        loaded = _load(args)
        traced = _trace(args, loaded.model, loaded.input_shape)
        space = build_space(traced.chain, conv_weights(traced))
        task = _task(args)
        splits = _splits(args, task, loaded.input_shape)
        # The weights are identified by their digest (in the library's meta), not by
        # their path, so a resume from another directory is not refused.
        meta = {
            "model": args.model,
            "model_kwargs": json.dumps(parse_kwargs(args.model_kwargs), sort_keys=True),
        }
        res = build_importance_tables(
            traced,
            space,
            task,
            splits,
            args.out,
            conv_out=False if args.no_conv else args.conv_out,
            recipe=recipe,
            reinit=args.reinit,
            device=device,
            dist=dist,
            meta=meta,
            progress=not args.no_progress,
            limit=args.limit,
        )
        base = res.base["val"]
        result = {
            "importance": str(res.importance),
            "conv_importance": str(res.conv_importance) if res.conv_importance else None,
            "measured": res.measured,
            "skipped": res.skipped,
            "seconds": round(res.seconds, 2),
            "base_val_accuracy": base.get("accuracy"),
            "base_val_loss": base.get("loss"),
        }
        line = (
            f"importance of {len(space.options)} options written to {res.importance}"
            + (f", per-conv table to {res.conv_importance}" if res.conv_importance else "")
            + f" ({res.measured} measured now, {res.skipped} already there; "
            f"{res.seconds:.0f}s; base holdout-val accuracy {base.get('accuracy', 0):.2f}%)"
        )
        if args.limit is not None and res.measured >= args.limit:
            line = f"stopped after {res.measured} entries (--limit); rerun to continue"
        _print_result(args, dist, result, line)
    return 0


# ----------------------------------------------------------------------------- evaluate


def _register_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="accuracy and loss of a network (or of a plan's merged network) on the test split",
        description=(
            "Evaluate MODEL with --weights on the test split. With --plan, --weights is the "
            "train-time network's state dict written by finetune: the plan is applied, the "
            "weights loaded, the network merged (and verified), and the merged network "
            "evaluated."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", default=None, metavar="plan.json")
    _add_data_args(p, holdout=True)
    p.add_argument(
        "--split",
        choices=["test", "holdout-val", "holdout-train", "train"],
        default="test",
        help="which split (default test)",
    )
    p.add_argument("--batch-size", type=int, default=500)
    _add_run_args(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from layermerge.plan import Plan
    from layermerge.train import evaluate, load_train_net
    from layermerge.transform import MergeVerificationError, merge

    with _session(args) as (device, dist):
        if args.plan:
            plan = Plan.load(args.plan)
            loaded = _load(args, weights=False)
            traced = _trace(args, loaded.model, loaded.input_shape)
            train_net = load_train_net(traced, plan, args.weights)
            try:
                model = merge(train_net)
            except MergeVerificationError as e:
                raise UserError(str(e)) from None
        else:
            loaded = _load(args)
            model = loaded.model
        task = _task(args)
        splits = _splits(args, task, loaded.input_shape)
        split = splits.split(args.split)
        met = evaluate(
            model.to(device),
            task,
            split,
            batch_size=args.batch_size,
            device=device,
            dist=dist,
            progress=not args.no_progress,
        )
        result = {"model": args.model, "plan": args.plan, "split": args.split, **met}
        if dist.is_main:
            if args.json:
                print(json.dumps(result))
            else:
                for k, v in met.items():
                    print(f"{k} {v:.6g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m layermerge.cli_train COMMAND ...``: the full CLI with these commands
    registered, whether or not :mod:`layermerge.cli` lists this module yet."""
    from layermerge import cli

    if "layermerge.cli_train" not in cli.OPTIONAL_COMMANDS:
        cli.OPTIONAL_COMMANDS = (*cli.OPTIONAL_COMMANDS, "layermerge.cli_train")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
