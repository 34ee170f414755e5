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
    _register_sample(subparsers)
    _register_fid(subparsers)


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


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task")
    g.add_argument(
        "--task",
        choices=["classification", "diffusion"],
        default="classification",
        help="classification (cross-entropy, accuracy) or diffusion (denoising loss of a "
        "UNet called as model(x, t); images scaled to [-1, 1]; default classification)",
    )
    _add_schedule_args(g)
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


def _add_schedule_args(g) -> None:
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


def _schedule(args):
    from layermerge.diffusion import NoiseSchedule

    try:
        return NoiseSchedule(
            num_train_timesteps=args.num_train_timesteps,
            beta_start=args.beta_start,
            beta_end=args.beta_end,
            beta_schedule=args.beta_schedule,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


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
    g.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        metavar="D",
        help="keep an EMA of the weights (with warm-up), evaluate and save it (0: off)",
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
            ema_decay=getattr(args, "ema_decay", 0.0),
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
        if getattr(args, "task", "classification") == "diffusion":
            from layermerge.diffusion import DiffusionTask

            return DiffusionTask(
                _schedule(args),
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


def _score(metrics: dict[str, float]) -> str:
    if "accuracy" in metrics:
        return f"accuracy {metrics['accuracy']:.2f}%"
    return f"loss {metrics['loss']:.5f}"


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
    _add_task_args(p)
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
        loss = last.get(f"{args.eval_split}_loss")
        score = ""
        if acc is not None:
            score = f" ({args.eval_split} accuracy {acc:.2f}%)"
        elif loss is not None:
            score = f" ({args.eval_split} loss {loss:.5f})"
        _print_result(
            args,
            dist,
            result,
            f"trained {args.model} for {res.steps} steps{score}; weights written to {args.out}",
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
    _add_task_args(p)
    _add_recipe_args(p, FINETUNE_DEFAULTS)
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        metavar="W",
        help="weight of distillation from the unmodified network (0: off; classification: "
        "KL of its logits, diffusion: MSE to its predicted noise)",
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
                    print(f"{name}: {eval_split.name} {_score(met)}")
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
        elif "merged_loss" in result:
            line += f"; merged network (verified): {eval_split.name} loss "
            line += f"{result['merged_loss']:.5f}"
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
    _add_task_args(p)
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
            f"{res.seconds:.0f}s; base holdout-val {_score(base)})"
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
    _add_task_args(p)
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


# ----------------------------------------------------------------------------- sample


def _add_sampler_args(p: argparse.ArgumentParser, n_default: int) -> None:
    g = p.add_argument_group("sampling (DDIM)")
    g.add_argument("--n", type=int, default=n_default, help=f"images (default {n_default})")
    g.add_argument("--steps", type=int, default=100, help="DDIM steps (default 100)")
    g.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    g.add_argument("--seed", type=int, default=0, help="image i uses the seed (SEED, i)")
    g.add_argument("--sample-batch-size", type=int, default=100, metavar="B")
    g.add_argument(
        "--clip-sample",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip the predicted x0 to [-1, 1] at every step (DDIMScheduler default)",
    )
    _add_schedule_args(g)


def _sample(args, unet, device):
    from layermerge.diffusion import sample

    try:
        return sample(
            unet,
            args.n,
            steps=args.steps,
            eta=args.eta,
            seed=args.seed,
            batch_size=args.sample_batch_size,
            schedule=_schedule(args),
            clip_sample=args.clip_sample,
            device=device,
            progress=not args.no_progress,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def _load_unet(args):
    """MODEL with --weights, or with --plan the merged network of a fine-tuned plan.
    Without --weights the initialisation is seeded (0), so an untrained model is
    reproducible."""
    import torch

    torch.manual_seed(0)
    if not getattr(args, "plan", None):
        return _load(args).model
    from layermerge.plan import Plan
    from layermerge.train import load_train_net
    from layermerge.transform import MergeVerificationError, merge

    loaded = _load(args, weights=False)
    traced = _trace(args, loaded.model, loaded.input_shape)
    try:
        return merge(load_train_net(traced, Plan.load(args.plan), args.weights))
    except MergeVerificationError as e:
        raise UserError(str(e)) from None


def _register_sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images from a diffusion UNet and write them as a PNG grid",
        description=(
            "Sample --n images from MODEL (a UNet called as model(x, t), e.g. "
            "diffusers:ddpm-small) with --weights, by DDIM (diffusers DDIMPipeline), and "
            "write them as one PNG grid. With --plan, --weights is the train-time state "
            "dict written by finetune and the merged network is sampled."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", default=None, metavar="plan.json")
    _add_sampler_args(p, 64)
    p.add_argument("--out", required=True, metavar="GRID.png", help="PNG grid of the samples")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: square)")
    p.add_argument(
        "--save-tensor",
        default=None,
        metavar="S.safetensors",
        help="also save the samples (float, [-1, 1]) as safetensors",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from layermerge.diffusion import image_grid

    with _session(args) as (device, dist):
        unet = _load_unet(args)
        t0 = time.time()
        images = _sample(args, unet, device)
        seconds = time.time() - t0
        if dist.is_main:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, args.nrow).save(out)
            if args.save_tensor:
                from safetensors.torch import save_file

                save_file({"images": images.contiguous()}, args.save_tensor)
        result = {
            "out": str(args.out),
            "n": args.n,
            "steps": args.steps,
            "eta": args.eta,
            "seconds": round(seconds, 3),
        }
        _print_result(
            args,
            dist,
            result,
            f"{args.n} samples ({args.steps} DDIM steps, {seconds:.1f}s) written to {args.out}",
        )
    return 0


# ----------------------------------------------------------------------------- fid


def _register_fid(sub) -> None:
    p = sub.add_parser(
        "fid",
        help="FID of a diffusion UNet's samples against a data split (with its feature space)",
        description=(
            "Sample --n images from MODEL with --weights (DDIM, as `layermerge sample`) and "
            "compute their Frechet distance to the images of --ref-split, in the features "
            "of --features: 'classifier' (penultimate layer of a classifier trained on the "
            "same data: --classifier, --classifier-weights; not comparable to Inception "
            "FID) or 'inception' (torch-fidelity or pytorch-fid with their weights already "
            "on disk). Every result carries the name of its feature space. --images scores "
            "samples saved by `layermerge sample --save-tensor`; --real SPLIT scores --n "
            "real images of SPLIT (a sanity anchor; MODEL then only gives the image shape)."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", default=None, metavar="plan.json")
    _add_data_args(p)
    _add_sampler_args(p, 500)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", default=None, metavar="S.safetensors", help="saved samples")
    src.add_argument(
        "--real", choices=["train", "test"], default=None, help="score real images of SPLIT"
    )
    g = p.add_argument_group("features")
    g.add_argument("--features", choices=["classifier", "inception"], default="classifier")
    g.add_argument("--classifier", default="layermerge:resnet20", metavar="MODEL")
    g.add_argument("--classifier-kwargs", default='{"in_chans": 1}', metavar="JSON")
    g.add_argument("--classifier-weights", default=None, metavar="W.pt")
    g.add_argument(
        "--inception-weights", default=None, metavar="PATH", help="torch-fidelity weights file"
    )
    g.add_argument("--ref-split", choices=["test", "train"], default="test")
    g.add_argument(
        "--ref-limit", type=int, default=None, metavar="N", help="first N reference images"
    )
    g.add_argument(
        "--ref-cache",
        default=None,
        metavar="STATS.npz",
        help="cache of the reference statistics (.npz + .npz.json; reused when it matches)",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_fid)


def cmd_fid(args) -> int:
    from layermerge.diffusion import DiffusionTask
    from layermerge.fid import (
        FeaturesUnavailableError,
        fid_of_images,
        inception_features,
        load_classifier_features,
        reference_stats,
        split_images,
    )
    from layermerge.models import ModelLoadError

    with _session(args) as (device, dist):
        try:
            if args.features == "inception":
                extractor = inception_features(args.inception_weights, device=device)
            else:
                if args.classifier_weights is None:
                    raise UserError(
                        "classifier features need --classifier-weights (a classifier trained "
                        "on the same data, e.g. by `layermerge train layermerge:resnet20 "
                        "--model-kwargs '{\"in_chans\": 1}' --input-shape 1,32,32`)"
                    )
                extractor = load_classifier_features(
                    args.classifier,
                    args.classifier_weights,
                    args.data,
                    model_kwargs=args.classifier_kwargs,
                    device=device,
                )
        except (FeaturesUnavailableError, ModelLoadError) as e:
            raise UserError(str(e)) from None
        real = args.real is not None
        loaded = _load(args, weights=False)  # the image shape (the UNet: _load_unet)
        splits = DiffusionTask().make_data(args.data, loaded.input_shape)
        ref = reference_stats(
            extractor,
            splits.split(args.ref_split),
            cache=args.ref_cache,
            limit=args.ref_limit,
            source={"data": str(splits.dataset.spec), "transform": repr(splits.transform)},
        )
        t0 = time.time()
        if real:
            images = _cat(split_images(splits.split(args.real), limit=args.n))
            what = f"{len(images)} real {args.real} images"
        elif args.images:
            from safetensors.torch import load_file

            images = load_file(args.images)["images"]
            what = f"{len(images)} samples from {args.images}"
        else:
            unet = _load_unet(args)
            images = _sample(args, unet, device)
            what = f"{len(images)} samples ({args.steps} DDIM steps, eta {args.eta:g})"
        seconds = time.time() - t0
        res = fid_of_images(images, extractor, ref)
        result = {
            **res.to_dict(),
            "images": what,
            "ref_split": args.ref_split,
            "sampling_seconds": round(seconds, 3),
        }
        _print_result(args, dist, result, f"{res} [{what} vs {args.ref_split} split]")
    return 0


def _cat(parts):
    import torch

    return torch.cat(list(parts))


def main(argv: list[str] | None = None) -> int:
    """``python -m layermerge.cli_train COMMAND ...``: the full CLI with these commands
    registered, whether or not :mod:`layermerge.cli` lists this module yet."""
    from layermerge import cli

    if "layermerge.cli_train" not in cli.OPTIONAL_COMMANDS:
        cli.OPTIONAL_COMMANDS = (*cli.OPTIONAL_COMMANDS, "layermerge.cli_train")
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
