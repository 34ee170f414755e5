"""Fine-tune one plan: the train-time network of a plan, holding the base network's
weights, trained with a recipe (optionally distilled from the base network),
saved, merged into the deploy network and verified against it.

Used by every compress run (per distinct plan) and by ``layermerge finetune``;
:func:`summarize_seeds` makes a report row of several fine-tunes of one network.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import Split
from ..distributed import DistInfo, from_env
from ..families import TracedModel
from ..plan import Plan
from ..tasks import Task
from ..train import FitResult, Recipe, evaluate, fit, save_state_dict
from ..transform import compare, count_layers, load_train_net, merge


@dataclass
class FinetuneResult:
    """What :func:`finetune_plan` made and measured."""

    train_net: nn.Module  # the fine-tuned train-time network (CPU, eval mode)
    deploy: nn.Module  # its merged, verified deploy network (CPU)
    fit: FitResult
    recipe: Recipe
    merge_max_rel_err: float
    before: dict[str, float] | None  # metrics of the train-time network before training
    after: dict[str, float] | None  # metrics of the deploy network
    params: int
    layers: dict[str, int]  # the deploy network's convs and activations

    @property
    def steps(self) -> int:
        return self.fit.steps


def finetune_plan(
    traced: TracedModel,
    plan: Plan | str | Path,
    task: Task,
    train_split: Split,
    recipe: Recipe,
    *,
    teacher: nn.Module | None = None,
    eval_split: Split | None = None,
    eval_task: Task | None = None,
    evaluate_before: bool = False,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    checkpoint: str | Path | None = None,
    resume: bool = True,
    dist: DistInfo | None = None,
    progress: bool = True,
    desc: str = "finetune",
    log: Callable[[dict[str, Any]], None] | None = None,
    workers: int = 0,
) -> FinetuneResult:
    """Fine-tune the train-time network of ``plan`` on ``traced``'s model (the base
    weights) with ``recipe`` on ``train_split``, then merge and verify it.

    ``teacher``: the uncompressed network, for a task that distils. ``eval_split``:
    scored (by ``eval_task``, default ``task``) on the deploy network after training
    and, with ``evaluate_before``, on the train-time network before. ``out``: where
    the fine-tuned train-time weights are saved (by rank 0), the state dict that
    :func:`layermerge.transform.deploy_network` takes back. Raises
    :class:`~layermerge.transform.MergeVerificationError` when the merged network
    does not compute what the train-time network computes.
    """
    dist = dist or from_env()
    eval_task = eval_task or task
    net = load_train_net(traced, plan).to(device)  # checks the plan against the model

    def score(m: nn.Module) -> dict[str, float]:
        return evaluate(
            m, eval_task, eval_split, batch_size=recipe.eval_batch_size, device=device, dist=dist
        )

    before = score(net) if evaluate_before and eval_split is not None else None
    fitted = fit(
        net,
        task,
        train_split,
        recipe,
        teacher=teacher,
        device=device,
        checkpoint=checkpoint,
        resume=resume,
        dist=dist,
        progress=progress,
        desc=desc,
        log=log,
        workers=workers,
    )
    net = net.cpu().float().eval()
    if out is not None and dist.is_main:
        save_state_dict(net, out)
    deploy = merge(net)  # verified against the train-time network (raises if not)
    err = compare(net, deploy)["max_rel_err"]
    after = None
    if eval_split is not None:
        after = score(deploy.to(device))
        deploy.cpu()
    return FinetuneResult(
        train_net=net,
        deploy=deploy,
        fit=fitted,
        recipe=recipe,
        merge_max_rel_err=err,
        before=before,
        after=after,
        params=sum(p.numel() for p in deploy.parameters()),
        layers=count_layers(deploy),
    )


def summarize_seeds(
    metrics: Sequence[dict[str, Any]], seeds: Sequence[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A report row's quality from the fine-tunes of one network with different seeds
    (each ``{"quality": {...}, "seed": n, ...}``): the mean over the seeds of every
    number all of them have, its SD (``KEY_std``), the task's metrics by seed, and
    the seed of median quality (of an even number, the lower middle one), which is
    the one exported. Returns the row's fields and that seed's record."""
    first = metrics[0]["key"]
    order = sorted(range(len(seeds)), key=lambda i: seeds[i]["quality"].get(first, 0.0))
    chosen = seeds[order[(len(order) - 1) // 2]]

    def numeric(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    keys = [k for k, v in chosen["quality"].items() if numeric(v)]
    keys = [k for k in keys if all(numeric(s["quality"].get(k)) for s in seeds)]
    quality = dict(chosen["quality"])  # the exported seed's, where no mean applies
    for key in keys:
        vals = [float(s["quality"][key]) for s in seeds]
        quality[key] = statistics.fmean(vals)
        quality[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    for spec in metrics:
        key = spec["key"]
        if key in quality:
            quality[f"{key}_mean"] = quality[key]
            quality[f"{key}_by_seed"] = [s["quality"][key] for s in seeds]
    fields = {
        **quality,
        "seeds": len(seeds),
        "exported_seed": chosen["seed"],
        # the quality of the shipped network (the seed of median quality)
        "exported_quality": {
            spec["key"]: chosen["quality"][spec["key"]]
            for spec in metrics
            if spec["key"] in chosen["quality"]
        },
    }
    return fields, chosen
