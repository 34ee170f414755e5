"""Network rows: compressed networks of a compress run that are not plans.

Every LayerMerge method gives a plan of the traced chain; the comparison method
``channelprune`` (structured channel pruning with torch-pruning,
:mod:`layermerge.channelprune`) gives a thinner copy of the base network instead.
Its rows say ``"kind": "network"`` (plan rows have no ``kind``) and carry the
pruning ratio instead of a plan; the rest of the pipeline treats both alike through
:func:`deploy_module` (the network a row deploys, which the timing pool times and
the exports write) and :func:`row_plan` (``None`` for a network row).

Per budget fraction, a stage ``channelprune:FRAC`` bisects the pruning ratio until
the pruned network (BatchNorm folded, as the base network is) measures within
``FRAC`` x the base network's latency on the primary backend: each candidate is
timed interleaved with the base network, and its latency is taken relative to the
base's in that pair (times the base's own first measurement), so a change of the
machine's load between candidates moves both alike. The network is then fine-tuned
with the plans' recipe, seeds and distillation, exported (ONNX and the others of
``export.formats``, plus the fine-tuned pruned network's state dict, which
:func:`layermerge.channelprune.load_pruned` puts back into the base network pruned
again at the same ratio), timed in the same pool as every plan, and shipped.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..channelprune import (
    count_macs,
    count_params,
    find_ratio,
    load_pruned,
    prune_channels,
    settings,
)
from ..export import FORMATS, export
from ..latency import TimingConfig, measure_interleaved, table_statistic
from ..plan import Plan
from ..space import build_space
from ..trace import trace
from ..train import evaluate, fit, save_state_dict
from ..transform import count_layers, deploy_network
from .finetune import summarize_seeds
from .run import Run
from .stages import digest


def is_network(row: dict[str, Any]) -> bool:
    """Whether ``row`` is a network row (else a plan row)."""
    return row.get("kind") == "network"


def row_plan(run: Run, row: dict[str, Any]) -> Plan | None:
    """The plan of a plan row; ``None`` for a network row."""
    return None if is_network(row) else Plan.load(run.rd / row["plan"])


def example_input(run: Run) -> torch.Tensor:
    """The batch torch-pruning traces (only its shape matters)."""
    return torch.zeros(1, *run.input_shape)


def fold(net: nn.Module, input_shape, *, one_input: bool = True, export: bool = False):
    """``net`` with its BatchNorms folded into the convs, as the base network is timed:
    the deploy network of its identity plan. ``one_input``: as the latency backends
    time it; ``export``: as the exporters write it."""
    traced = trace(copy.deepcopy(net).eval(), input_shape)
    deployed = deploy_network(traced, build_space(traced.chain).identity_plan())
    if export:
        return traced.family.export_module(deployed)
    return traced.family.forward_module(deployed) if one_input else deployed


def pruned_network(run: Run, row: dict[str, Any], weights: str | Path | None = None) -> nn.Module:
    """The network of a network row (not folded): the base network pruned at the
    row's ratio, with the fine-tuned ``weights`` when given."""
    # rows of runs before round_to was recorded were pruned to any width
    round_to = (row.get("search") or {}).get("pruning", {}).get("round_to")
    x = example_input(run)
    if weights is None:
        net = prune_channels(run.base_model, row["ratio"], x, round_to=round_to)
    else:
        net = load_pruned(run.base_model, row["ratio"], x, weights, round_to=round_to)
    # trainable, whatever the base network is (a distillation teacher is frozen)
    return net.requires_grad_(True)


def deploy_module(
    run: Run, row: dict[str, Any], weights: str | Path | None = None, *, one_input: bool = True
) -> nn.Module:
    """The deploy network of ``row``: a plan's merged network, or a pruned network
    with its BatchNorms folded; with fine-tuned ``weights`` (of the train-time or
    pruned network) when given. ``one_input``: as the latency backends time it."""
    if not is_network(row):
        return deploy_network(run.traced, row_plan(run, row), weights, one_input=one_input)
    return fold(pruned_network(run, row, weights), run.input_shape, one_input=one_input)


# --------------------------------------------------------------------------- search


def network_rows(run: Run) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the network methods of ``solve.methods`` (one per budget), and
    notes on budgets they could not meet."""
    cfg = run.cfg
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if "channelprune" not in cfg.solve.methods:  # the one of NETWORK_METHODS
        return rows, notes
    for frac in sorted(cfg.solve.budgets, reverse=True):
        res = _search_stage(run, frac)
        row = {
            "method": "channelprune",
            "kind": "network",
            "budget_frac": frac,
            "plan": None,
            "ratio": res["ratio"],
            "predicted_ms": None,  # the LayerMerge tables do not apply
            "objective": None,
            "budget_ms": res["budget_ms"],
            "search_ms": res["measured_ms"],
            "search": {
                k: res[k]
                for k in (
                    "base_ms",
                    "within_budget",
                    "statistic",
                    "trials",
                    "macs",
                    "pruning",
                    "searched",
                )
                if k in res
            },
            "digest": digest(
                {
                    "method": "channelprune",
                    "ratio": res["ratio"],
                    "base": run.runner.key("base"),
                    "pruning": res["pruning"],
                }
            ),
        }
        if not res["within_budget"]:
            notes.append(
                f"channelprune at budget {frac:g}: even ratio {res['ratio']:g} measured "
                f"{res['measured_ms']:.3f} ms, over the budget of {res['budget_ms']:.3f} ms; "
                "the row is that network"
            )
        rows.append(row)
    return rows, notes


def _search_stage(run: Run, frac: float) -> dict[str, Any]:
    cfg, bench = run.cfg, run.cfg.benchmark
    tried = list(cfg.solve.channelprune_round_to)
    search = {**settings(), "round_to": tried}

    def stage():
        backend = run.backends[run.primary]
        table = run.tables.get(run.primary)
        statistic = table_statistic(table) if table is not None else TimingConfig().statistic
        shape = run.traced.chain.input_shape
        x = example_input(run)
        identity = deploy_network(run.traced, run.space.identity_plan(), one_input=True)
        base = backend.prepare(identity, shape)

        def timed(runs: dict) -> dict[str, float]:
            with backend.session():
                res = measure_interleaved(
                    runs,
                    rounds=bench.forward_rounds or bench.rounds,
                    calls_per_round=bench.calls_per_round,
                    max_time_s=bench.max_time_s * len(runs) / 2,
                    clock=backend.clock,
                )
            return {name: m.value(statistic) for name, m in res.items()}

        base_ms = timed({"base": base})["base"]
        budget_ms = frac * base_ms
        pairs: list[dict[str, float]] = []

        def measure(net: nn.Module) -> float:
            t = timed({"base": base, "pruned": backend.prepare(fold(net, shape), shape)})
            pairs.append({"pair_base_ms": t["base"], "pair_pruned_ms": t["pruned"]})
            return base_ms * t["pruned"] / t["base"]

        # one bisection per width rounding; the network kept is the one within the
        # budget with the most parameters left (none within: the fastest)
        found_by: list[dict[str, Any]] = []
        for round_to in tried:
            trials: list[dict[str, Any]] = []
            pairs.clear()
            # ratio 0 is the base network itself: its latency is base_ms, not measured
            found = find_ratio(
                run.base_model,
                x,
                budget_ms,
                measure,
                low_ms=base_ms,
                trials=trials,
                prune=functools.partial(prune_channels, round_to=round_to),
            )
            for t, p in zip(trials, pairs):
                t.update(p)
            net = prune_channels(run.base_model, found.ratio, x, round_to=round_to)
            found_by.append(
                {
                    "round_to": round_to,
                    "ratio": found.ratio,
                    "measured_ms": found.measured_ms,
                    "within_budget": found.measured_ms <= budget_ms,
                    "params": count_params(fold(net, shape)),
                    "trials": trials,
                    "macs": count_macs(net, x),
                }
            )
        best = max(
            found_by,
            key=lambda f: (
                f["within_budget"],
                f["params"] if f["within_budget"] else 0,
                -f["measured_ms"],
            ),
        )
        return {
            "ratio": best["ratio"],
            "measured_ms": best["measured_ms"],
            "budget_ms": budget_ms,
            "base_ms": base_ms,
            "within_budget": best["within_budget"],
            "statistic": statistic,
            "trials": best["trials"],
            "params": best["params"],
            "macs": {"base": count_macs(run.base_model, x), "pruned": best["macs"]},
            # what prunes this network (round_to: the rounding kept)
            "pruning": {**settings(), "round_to": best["round_to"]},
            "searched": [
                {k: v for k, v in f.items() if k not in ("trials", "macs")} for f in found_by
            ],
        }

    inputs = {
        "base": run.runner.key("base"),
        "frac": frac,
        "backend": run.primary,
        "pruning": search,
        **cfg.section("latency"),
        **cfg.section("benchmark"),
    }
    return run.runner.run(f"channelprune:{frac:g}", inputs, stage)


# --------------------------------------------------------------------- fine-tune


def _finetune_seed(run: Run, row: dict[str, Any], k: int) -> dict[str, Any]:
    """Fine-tune the network of ``row`` with the run's seed + ``k`` and score it, as
    :func:`layermerge.pipeline.finetune.finetune_plan` does a plan's."""
    cfg, rd, hooks = run.cfg, run.rd, run.hooks
    d = row["digest"]
    tag = d if k == 0 else f"{d}-s{k}"
    ft_name = f"finetuned/{tag}.safetensors"
    section = {key: v for key, v in cfg.section("finetune").items() if key != "seeds"}
    ft_inputs = {"base": run.runner.key("base"), "network": d, **section}
    if k:
        ft_inputs["seed_offset"] = k

    def stage():
        ft_task = hooks.finetune_task()
        recipe = cfg.recipe("finetune", seed=cfg.seed + k)
        net = pruned_network(run, row).to(run.device)

        def score(m: nn.Module) -> dict[str, float]:
            return evaluate(
                m,
                run.task,
                hooks.eval_split(run),
                batch_size=recipe.eval_batch_size,
                device=run.device,
            )

        before = hooks.quality_of(score(net)) if hooks.score_before else {}
        fitted = fit(
            net,
            ft_task,
            run.splits.train,
            recipe,
            teacher=run.base_model if cfg.finetune.distill > 0 else None,
            device=run.device,
            checkpoint=rd / f"finetuned/{tag}-{digest(ft_inputs)}.ckpt",
            desc="finetune channelprune" + (f" seed +{k}" if k else ""),
            workers=cfg.workers,
        )
        net = net.cpu().float().eval()
        if run.main:
            save_state_dict(net, rd / ft_name)
        deploy = fold(net, run.input_shape, one_input=False)
        after = score(deploy.to(run.device))
        deploy.cpu()
        layers = count_layers(deploy)
        return {
            **hooks.quality_of(after),
            **{f"{key}_before": v for key, v in before.items()},
            "params": count_params(deploy),
            "convs": layers["convs"],
            "activations": layers["activations"],
            "recipe": recipe.to_dict(),
            "task": ft_task.settings(),
            "steps": fitted.steps,
        }

    name = f"finetune:{tag}" if k == 0 else f"finetune:{d}:seed+{k}"
    ft = run.runner.run(name, ft_inputs, stage, outputs=[ft_name], ranks="all")
    ft_key = run.runner.key(name)
    quality: dict[str, Any] = {}
    for key in ft:
        if key.endswith("_before"):
            quality[key.removesuffix("_before") + "_before_finetune"] = ft[key]
    for spec in hooks.metrics:
        if spec["key"] in ft:
            quality[spec["key"]] = ft[spec["key"]]
    extra = hooks.quality_stage(
        run, tag, ft_key, lambda: deploy_module(run, row, rd / ft_name, one_input=False)
    )
    quality.update({key: v for key, v in extra.items() if key != "files"})
    return {"ft": ft, "key": ft_key, "file": ft_name, "quality": quality, "seed": cfg.seed + k}


def network_stages(run: Run, row: dict[str, Any]) -> None:
    """Fine-tune (``finetune.seeds`` times), score and export the network of ``row``,
    as the plan rows are (the row's quality: the mean over the seeds; the exported
    network: the seed of median quality)."""
    cfg, rd = run.cfg, run.rd
    d = row["digest"]
    seeds = [_finetune_seed(run, row, k) for k in range(cfg.finetune.seeds)]
    fields, chosen = summarize_seeds(run.hooks.metrics, seeds)
    ft = chosen["ft"]
    row.update(
        **fields,
        merge_max_rel_err=None,
        params=ft["params"],
        convs=ft.get("convs"),
        activations=ft.get("activations"),
        kept_activations=None,
        kept_convs=None,
        merged_blocks=None,
    )

    def export_stage():
        pruned = pruned_network(run, row, rd / chosen["file"])
        net = fold(pruned, run.input_shape, export=True)
        out = {}
        for fmt in cfg.export.formats:
            r = export(net, fmt, rd / "export" / f"{d}{FORMATS[fmt]}", run.input_shape)
            out[fmt] = {
                "path": str(Path(r["path"]).relative_to(rd)),
                "max_rel_err": r["max_rel_err"],
            }
        if run.main:  # the pruned network's weights: load_pruned takes them back
            save_state_dict(pruned, rd / "export" / f"{d}.safetensors")
        out["weights"] = {"path": f"export/{d}.safetensors"}
        return out

    row["exports"] = run.runner.run(
        f"export:{d}",
        {"finetune": chosen["key"], **cfg.section("export"), "inputs": "all+weights"},
        export_stage,
        outputs=[f"export/{d}{FORMATS[f]}" for f in cfg.export.formats]
        + [f"export/{d}.safetensors"],
    )
