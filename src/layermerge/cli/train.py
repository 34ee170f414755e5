"""``layermerge train | finetune | importance | evaluate``: the commands that train or
evaluate on a dataset.

Each works the same as a single process or under ``torchrun`` (DistributedDataParallel
for train and finetune, entries spread across ranks for importance).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import torch

from ..importance import DEFAULT_PROTOCOL, PROTOCOLS, build_importance_tables
from ..models import parse_kwargs
from ..pipeline.finetune import finetune_plan
from ..plan import Plan
from ..protocols import resolve_protocol
from ..space import build_space
from ..trace import conv_weights
from ..train import IMPORTANCE_RECIPE, Recipe, evaluate, fit, save_state_dict
from ..transform import MergeVerificationError
from .common import (
    UsageError,
    UserError,
    add_data_args,
    add_model_args,
    add_run_args,
    add_task_args,
    check_classes,
    deprecated_alias,
    load_network,
    nonnegative_float,
    positive_float,
    positive_int,
    print_json,
    score,
    session,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_finetune(subparsers)
    _register_importance(subparsers)
    _register_evaluate(subparsers)


# ------------------------------------------------------------------------------ recipe

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
IMPORTANCE_DEFAULTS = IMPORTANCE_RECIPE  # the reference implementation's protocol


def _add_recipe_args(p: argparse.ArgumentParser, d: dict[str, Any], importance: bool = False):
    g = p.add_argument_group("recipe")
    length = g.add_mutually_exclusive_group()
    length.add_argument(
        "--epochs", type=positive_float, default=None, help=f"epochs (default {d['epochs']:g})"
    )
    length.add_argument(
        "--steps", type=positive_int, default=None, help="optimizer steps (overrides)"
    )
    g.add_argument(
        "--batch-size", type=positive_int, default=d["batch_size"], help="global batch size"
    )
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default=d["optimizer"])
    g.add_argument(
        "--lr", type=nonnegative_float, default=d["lr"], help=f"peak learning rate ({d['lr']:g})"
    )
    g.add_argument("--momentum", type=nonnegative_float, default=d["momentum"])
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=d["nesterov"],
        help="Nesterov momentum (SGD)",
    )
    g.add_argument("--weight-decay", type=nonnegative_float, default=d["weight_decay"])
    g.add_argument("--warmup-epochs", type=nonnegative_float, default=d["warmup_epochs"])
    g.add_argument(
        "--min-lr", type=nonnegative_float, default=d["min_lr"], help="end of the cosine (0)"
    )
    g.add_argument("--grad-clip", type=positive_float, default=None, metavar="NORM")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="AMP on CUDA")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--eval-batch-size", type=positive_int, default=500)
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the dataset's training augmentation (shifts, flips, crops)",
    )
    g.add_argument(
        "--ema-decay",
        type=nonnegative_float,
        default=0.0,
        metavar="D",
        help="keep an EMA of the weights (with warm-up), evaluate and save it (0: off)",
    )
    if not importance:
        g.add_argument(
            "--label-smoothing", type=nonnegative_float, default=d.get("label_smoothing", 0.0)
        )


def _recipe(args, defaults: dict[str, Any]) -> Recipe:
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
        raise UsageError(str(e)) from None


def _add_fit_args(p: argparse.ArgumentParser, out_help: str) -> None:
    """--out, --checkpoint, --no-resume and --eval-split of the commands that fit."""
    p.add_argument("--out", required=True, metavar="W.pt", help=out_help)
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: OUT.ckpt)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--eval-split", choices=["test", "holdout-val", "none"], default="test", help="per epoch"
    )


def _fit(s, net, task, splits, recipe, *, teacher=None):
    """``fit`` under the session's device, process group, checkpoint and logging."""
    a = s.args
    return fit(
        net,
        task,
        splits.train,
        recipe,
        eval_split=s.eval_split(splits),
        teacher=teacher,
        device=s.device,
        checkpoint=s.checkpoint(),
        resume=not a.no_resume,
        dist=s.dist,
        progress=not a.no_progress,
        log=s.logger(),
        workers=a.workers,
    )


# ------------------------------------------------------------------------------- train


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
    add_data_args(p)
    add_task_args(p)
    _add_recipe_args(p, TRAIN_DEFAULTS)
    _add_fit_args(p, "state dict (.pt or .safetensors)")
    add_run_args(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    recipe = _recipe(args, TRAIN_DEFAULTS)
    with session(args) as s:
        # The initialisation comes from --seed too: a rerun (or every rank) starts alike.
        torch.manual_seed(recipe.seed)
        run = s.prepare(seed=recipe.seed)
        t0 = time.time()
        res = _fit(s, run.loaded.model, run.task, run.splits, recipe)
        if s.is_main:
            save_state_dict(run.loaded.model, args.out)
        last = res.history[-1] if res.history else {}
        result = {"out": str(args.out), "steps": res.steps, "seconds": time.time() - t0, **last}
        acc = next((v for k, v in last.items() if k.endswith("_accuracy")), None)
        loss = last.get(f"{args.eval_split}_loss")
        how = ""
        if acc is not None:
            how = f" ({args.eval_split} accuracy {acc:.2f}%)"
        elif loss is not None:
            how = f" ({args.eval_split} loss {loss:.5f})"
        s.emit(
            result,
            f"trained {args.model} for {res.steps} steps{how}; weights written to {args.out}",
        )
    return 0


# ---------------------------------------------------------------------------- finetune


def _register_finetune(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune the train-time network of a plan, then merge and verify it",
        description=(
            "Apply PLAN to MODEL with its trained --weights, fine-tune the train-time "
            "network (optionally distilling from the unmodified network), save its state "
            "dict to --out, then merge it into the deploy network, verify the merge and "
            "evaluate it. Load the result back with: the same MODEL + PLAN + `layermerge "
            "evaluate --plan PLAN --weights OUT` (library: "
            "layermerge.transform.deploy_network)."
        ),
    )
    add_model_args(p)
    p.add_argument("--plan", required=True, metavar="plan.json")
    add_data_args(p)
    add_task_args(p)
    _add_recipe_args(p, FINETUNE_DEFAULTS)
    p.add_argument(
        "--distill",
        dest="distill_weight",
        type=nonnegative_float,
        default=0.0,
        metavar="W",
        help="weight of distillation from the unmodified network (0: off; classification: "
        "KL of its logits, diffusion: MSE to its predicted noise)",
    )
    deprecated_alias(p, "--distill-weight", "--distill", dest="distill_weight",
                     type=nonnegative_float)  # fmt: skip
    p.add_argument("--distill-temperature", type=positive_float, default=4.0, metavar="T")
    _add_fit_args(p, "train-time network state dict")
    p.add_argument(
        "--eval-before",
        action="store_true",
        help="also evaluate the unmodified network and the plan's network before fine-tuning",
    )
    add_run_args(p)
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args) -> int:
    if args.weights is None:
        raise UsageError("finetune needs the trained network's --weights")
    recipe = _recipe(args, FINETUNE_DEFAULTS)
    plan = Plan.load(args.plan)
    with session(args) as s:
        run = s.prepare(traced=True)
        build_space(run.traced.chain).check_plan(plan)
        eval_split = s.eval_split(run.splits)
        eval_before = args.eval_before and eval_split is not None
        result: dict[str, Any] = {"plan": plan.summary(), "out": str(args.out)}
        if eval_before:
            met = evaluate(
                copy.deepcopy(run.loaded.model).to(s.device),
                run.task,
                eval_split,
                batch_size=recipe.eval_batch_size,
                device=s.device,
                dist=s.dist,
            )
            result.update({f"base_{k}": v for k, v in met.items()})
            if s.is_main and not args.json:
                print(f"base: {eval_split.name} {score(met)}")
        t0 = time.time()
        try:
            res = finetune_plan(
                run.traced,
                plan,
                run.task,
                run.splits.train,
                recipe,
                teacher=copy.deepcopy(run.loaded.model) if args.distill_weight > 0 else None,
                eval_split=eval_split,
                evaluate_before=eval_before,
                out=args.out,
                device=s.device,
                checkpoint=s.checkpoint(),
                resume=not args.no_resume,
                dist=s.dist,
                progress=not args.no_progress,
                log=s.logger(),
                workers=args.workers,
            )
        except MergeVerificationError as e:
            raise UserError(f"the fine-tuned network did not merge exactly: {e}") from None
        if res.before is not None:
            result.update({f"applied_{k}": v for k, v in res.before.items()})
            if s.is_main and not args.json:
                print(f"applied (before fine-tuning): {eval_split.name} {score(res.before)}")
        result.update(steps=res.steps, seconds=time.time() - t0)
        result.update({f"merged_{k}": v for k, v in (res.after or {}).items()})
        line = f"fine-tuned {plan.summary()}; train-time weights written to {args.out}"
        if res.after is not None:
            line += f"; merged network (verified): {eval_split.name} {score(res.after)}"
        s.emit(result, line)
    return 0


# -------------------------------------------------------------------------- importance


def _register_importance(sub) -> None:
    p = sub.add_parser(
        "importance",
        help="build the importance table (and the per-conv table) of a trained network",
        description=(
            "For every option of the search space, apply its single-block plan to the "
            "trained network, run the importance protocol (a short fine-tune on "
            "holdout-train and/or a BatchNorm recalibration) and measure holdout-val; "
            "likewise with each reducible conv dropped (per-conv table for the layerprune "
            "baseline). The identity plan is measured first under the same protocol with "
            "several seeds: entries are scored against its mean, and its SD is the noise "
            "floor. Rows are written one by one: rerun the same command to resume. "
            "Under torchrun the entries are spread over the ranks."
        ),
    )
    add_model_args(p)
    add_data_args(p, holdout=True)
    add_task_args(p)
    _add_recipe_args(p, _importance_help_defaults(), importance=True)
    # the protocol fills in whatever of these is not given
    p.set_defaults(
        holdout_per_class=None,
        batch_size=None,
        lr=None,
        weight_decay=None,
        warmup_epochs=None,
        reinit=None,
    )
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="; ".join(f"{n}: {pr.summary}" for n, pr in PROTOCOLS.items())
        + f" (default {DEFAULT_PROTOCOL}; recipe and holdout flags override its values)",
    )
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps")
    g.add_argument(
        "--score",
        choices=["acc", "loss", "kl"],
        default=None,
        help="what the importance column is made of: holdout-val accuracy change, loss "
        "change, or KL divergence from the unmodified network's outputs (classification; "
        "the diffusion task always uses its loss ratio); default: the protocol's",
    )
    g.add_argument(
        "--calibration",
        dest="calibration_seeds",
        type=int,
        default=None,
        metavar="N",
        help="identity-plan entries measured for the calibrated base and noise floor "
        "(default 3; 0: score against the unmodified network, as the paper)",
    )
    deprecated_alias(g, "--calibration-seeds", "--calibration", dest="calibration_seeds", type=int)
    g.add_argument(
        "--bn-batches",
        type=int,
        default=None,
        metavar="N",
        help="recalibrate BatchNorm statistics on N holdout-train batches after the "
        "fine-tune (default: the protocol's)",
    )
    g.add_argument(
        "--reinit",
        choices=["single", "none"],
        default=None,
        help="re-initialise the conv of single-conv blocks before fine-tuning (reference) "
        "or keep its weights (default: the protocol's)",
    )
    p.add_argument("--out", required=True, metavar="I.csv", help="importance table")
    conv = p.add_mutually_exclusive_group()
    conv.add_argument(
        "--conv-out", default=None, metavar="C.csv", help="per-conv table (default I.conv.csv)"
    )
    conv.add_argument("--no-conv", action="store_true", help="skip the per-conv table")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="stop after measuring N entries (resumable)",
    )
    add_run_args(p)
    p.set_defaults(func=cmd_importance)


def _importance_help_defaults() -> dict[str, Any]:
    d = PROTOCOLS[DEFAULT_PROTOCOL]
    return {**IMPORTANCE_DEFAULTS, "epochs": 1.0, "batch_size": d.batch_size, "lr": d.lr}


def _importance_protocol(args):
    try:
        return resolve_protocol(
            args.protocol,
            dict(
                steps=args.steps,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                weight_decay=args.weight_decay,
                warmup_steps=args.warmup_steps,
                holdout_per_class=args.holdout_per_class,
                reinit=args.reinit,
                score=args.score,
                calibration=args.calibration_seeds,
                bn_batches=args.bn_batches,
            ),
            dict(
                optimizer=args.optimizer,
                momentum=args.momentum,
                nesterov=args.nesterov,
                warmup_epochs=args.warmup_epochs,
                min_lr=args.min_lr,
                grad_clip=args.grad_clip,
                amp=args.amp,
                seed=args.seed,
                eval_batch_size=args.eval_batch_size,
                augment=args.augment,
                ema_decay=args.ema_decay,
            ),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None


def cmd_importance(args) -> int:
    if args.weights is None:
        print(
            "layermerge importance: warning: no --weights, measuring a randomly initialised "
            "network",
            file=sys.stderr,
        )
    protocol, recipe = _importance_protocol(args)
    if args.holdout_per_class is None:
        args.holdout_per_class = 50  # drawn lazily; the protocol sets the holdout size
    with session(args) as s:
        run = s.prepare(traced=True)
        space = build_space(run.traced.chain, conv_weights(run.traced))
        # The weights are identified by their digest (in the library's meta), not by
        # their path, so a resume from another directory is not refused.
        meta = {
            "model": args.model,
            "model_kwargs": json.dumps(parse_kwargs(args.model_kwargs), sort_keys=True),
        }
        try:
            res = build_importance_tables(
                run.traced,
                space,
                run.task,
                run.splits,
                args.out,
                conv_out=False if args.no_conv else args.conv_out,
                protocol=protocol,
                recipe=recipe,
                seed=args.seed,
                device=s.device,
                dist=s.dist,
                meta=meta,
                progress=not args.no_progress,
                limit=args.limit,
            )
        except ValueError as e:
            raise UsageError(str(e)) from None
        base = res.base["val"]
        result = {
            "importance": str(res.importance),
            "conv_importance": str(res.conv_importance) if res.conv_importance else None,
            "protocol": protocol.name,
            "score": res.score,
            "measured": res.measured,
            "skipped": res.skipped,
            "seconds": round(res.seconds, 2),
            "base_val_accuracy": base.get("accuracy"),
            "base_val_loss": base.get("loss"),
            "calibration": res.calibration,
            "noise_floor": res.noise_floor,
            "spread": res.spread,
        }
        line = (
            f"importance of {len(space.options)} options ({protocol.name} protocol, score "
            f"{res.score}) written to {res.importance}"
            + (f", per-conv table to {res.conv_importance}" if res.conv_importance else "")
            + f" ({res.measured} measured now, {res.skipped} already there; "
            f"{res.seconds:.0f}s; base holdout-val {score(base)})"
        )
        if res.noise_floor is not None:
            line += (
                f"\nnoise floor: SD {res.noise_floor:.4g} of {res.calibration['seeds']} "
                f"identity-plan entries (score {res.score})"
            )
            if res.spread is not None:
                line += f"; spread of the options: SD {res.spread:.4g}"
        if args.limit is not None and res.spread is None and res.measured >= args.limit:
            line = f"stopped after {res.measured} entries (--limit); rerun to continue"
        elif res.within_noise and s.is_main:
            print(
                f"layermerge importance: warning: the options' spread (SD {res.spread:.4g}) "
                f"is within twice the noise floor (SD {res.noise_floor:.4g} of the identity "
                "plan under the same protocol): the table barely ranks the options; use a "
                "longer protocol, more holdout-val images or --score kl",
                file=sys.stderr,
            )
        s.emit(result, line)
    return 0


# ---------------------------------------------------------------------------- evaluate


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
    add_data_args(p, holdout=True)
    add_task_args(p)
    p.add_argument(
        "--split",
        choices=["test", "holdout-val", "holdout-train", "train"],
        default="test",
        help="which split (default test)",
    )
    p.add_argument("--batch-size", type=positive_int, default=500)
    add_run_args(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    with session(args) as s:
        loaded, model = load_network(args)
        task = s.task()
        splits = s.splits(task, loaded.input_shape)
        check_classes(loaded, task, splits, args.split, model)
        split = splits.split(args.split)
        met = evaluate(
            model.to(s.device),
            task,
            split,
            batch_size=args.batch_size,
            device=s.device,
            dist=s.dist,
            progress=not args.no_progress,
        )
        result = {"model": args.model, "plan": args.plan, "split": args.split, **met}
        if s.is_main:
            if args.json:
                print_json(result)
            else:
                for k, v in met.items():
                    print(f"{k} {v:.6g}")
    return 0
