"""Apply a plan (train-time network), merge it (deploy network) and verify the two.

The model family builds both networks (:mod:`layermerge.families`); this module
is what the rest of the library calls. :func:`merge` checks the deploy network
against the train-time network on a random input every time, not only in tests,
and :func:`deploy_network` is the one way from (model, plan, fine-tuned weights)
to a deploy network.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .families import MergeVerificationError, TracedModel, family_of, param_of
from .models import ModelLoadError, read_state_dict
from .plan import Plan
from .space import build_space

#: What the deploy network of a plan is, for the keys of cached stages that build or
#: price it. 2: an activation that repeats the same idempotent activation right
#: before it (``relu(relu(x))``, what a dropped conv leaves) is omitted, and such a
#: drop is priced at nothing.
DEPLOY_VERSION = 2

#: verification tolerances on max|a-b| / max|a|: float rounding of each dtype
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _as_plan(plan: Plan | str | Path) -> Plan:
    return plan if isinstance(plan, Plan) else Plan.load(plan)


def apply(traced: TracedModel, plan: Plan | str | Path) -> nn.Module:
    """The train-time network of ``plan``: an ``nn.Module`` holding the original
    weights that trains with autograd and is exactly equal to the merged network.
    The plan is checked against the chain first (PlanError naming what is wrong)."""
    plan = _as_plan(plan)
    build_space(traced.chain).check_plan(plan)
    return traced.family.apply(traced, plan)


def merge(train_net: nn.Module, *, verify: bool = True, seed: int = 0) -> nn.Module:
    """The deploy network of a train-time network made by :func:`apply`: one conv per
    block, BatchNorm folded. With ``verify`` (the default) it is compared with
    ``train_net`` on a random input; a mismatch raises MergeVerificationError."""
    deploy = family_of(train_net).merge(train_net)
    if verify:
        check_merged(train_net, deploy, seed=seed)
    return deploy


def _dtype(m: nn.Module) -> torch.dtype:
    p = param_of(m)
    return p.dtype if p is not None else torch.float32


def check_merged(train_net: nn.Module, deploy: nn.Module, *, seed: int = 0) -> None:
    """Raise MergeVerificationError unless ``deploy`` computes what ``train_net`` does
    (to the tolerance of its dtype)."""
    err = compare(train_net, deploy, seed=seed)
    tol = TOLERANCE.get(_dtype(deploy), 1e-4)
    if not err["max_rel_err"] <= tol:
        raise MergeVerificationError(
            f"merged network differs from the train-time network: relative error "
            f"{err['max_rel_err']:.3e} > {tol:.0e} (abs {err['max_abs_err']:.3e})"
        )


def compare(
    a: nn.Module,
    b: nn.Module,
    *,
    seed: int = 0,
    batch: int = 2,
    input_shape: tuple[int, ...] | None = None,
) -> dict:
    """Max absolute and relative (to max |a|) output difference on a random input
    (the family's: a UNet also gets random timesteps)."""
    family = family_of(a)
    g = torch.Generator().manual_seed(seed)
    inputs = family.example_inputs(a, batch, generator=g, input_shape=input_shape)
    with torch.no_grad():
        ya = family.output_tensor(a(*inputs))
        yb = family.output_tensor(b(*inputs))
    diff = (ya - yb).abs().max().item()
    return {"max_abs_err": diff, "max_rel_err": diff / max(ya.abs().max().item(), 1e-30)}


def count_layers(net: nn.Module) -> dict[str, int]:
    """Number of conv modules and activation calls on the network's main path."""
    return family_of(net).count_layers(net)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random statistics and affine parameters (in place).

    Freshly initialised BatchNorms are nearly the identity, which would let a wrong
    folding pass unnoticed; verification of a model without trained weights uses this.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:

            def u(lo, hi, n=m.num_features, like=m.running_mean):
                r = torch.rand(n, generator=g, dtype=torch.float64)
                return (r * (hi - lo) + lo).to(like)

            with torch.no_grad():
                m.running_mean.copy_(u(-0.2, 0.2))
                m.running_var.copy_(u(0.5, 2.0))
                if m.weight is not None:
                    m.weight.copy_(u(0.6, 1.4))
                    m.bias.copy_(u(-0.2, 0.2))
    return model


def verify(
    traced: TracedModel,
    plans: list[Plan],
    *,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Apply and merge every plan and compare deploy vs train-time outputs.

    Returns ``plans``, ``max_abs_err``, ``max_rel_err`` and ``failures`` (one
    entry per plan beyond tolerance or raising, with the reason).
    """
    family = traced.family
    tol = TOLERANCE.get(_dtype(traced.model), 1e-4)
    worst_abs = worst_rel = 0.0
    failures = []
    for k, plan in enumerate(plans):
        # fx GraphModules hold reference cycles: collect them now, or copies of a large
        # network (VGG's 100M-parameter classifier) pile up until memory runs out
        gc.collect()
        try:
            train_net = apply(traced, plan)
            # parameters a family adds fresh (the identity) get random values, so that
            # their folding is checked for real
            family.randomize_for_verification(train_net, seed + k)
            deploy = merge(train_net, verify=False)
            err = compare(train_net, deploy, seed=seed + k)
        except Exception as e:  # a failure is a result of verification, not a crash
            failures.append({"plan": k, "error": f"{type(e).__name__}: {e}"})
            continue
        worst_abs = max(worst_abs, err["max_abs_err"])
        worst_rel = max(worst_rel, err["max_rel_err"])
        if not err["max_rel_err"] <= tol:
            failures.append({"plan": k, "error": f"relative error {err['max_rel_err']:.3e}"})
        if progress is not None:
            progress(k + 1, len(plans))
    return {
        "plans": len(plans),
        "max_abs_err": worst_abs,
        "max_rel_err": worst_rel,
        "tolerance": tol,
        "failures": failures,
    }


def load_train_net(
    traced: TracedModel, plan: Plan | str | Path, weights: str | Path | dict | None = None
) -> nn.Module:
    """The train-time network of ``plan`` with fine-tuned ``weights`` (a state dict
    of the train-time network, as ``layermerge finetune`` saves it; a path or a dict)."""
    net = apply(traced, plan)
    if weights is not None:
        sd = weights if isinstance(weights, dict) else read_state_dict(weights)
        result = net.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(
                f"the weights do not fit the train-time network of this plan (missing "
                f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}); pass "
                "the state dict written by `layermerge finetune` for this model and plan"
            )
    return net


def deploy_network(
    traced: TracedModel,
    plan: Plan | str | Path,
    train_weights: str | Path | dict | None = None,
    *,
    verify: bool = True,
    one_input: bool = False,
) -> nn.Module:
    """The deploy network of ``plan`` (a Plan or a plan file) for the traced model,
    optionally with the fine-tuned train-time weights, merged and verified.

    The identity plan gives the original network with BatchNorm folded, the fair
    baseline for timing. ``one_input`` wraps the network as a module of one tensor
    input and output (:meth:`Family.forward_module`), which the latency backends time
    and the exporters write (a UNet then runs at the traced timestep).
    """
    net = merge(load_train_net(traced, plan, train_weights), verify=verify)
    return traced.family.forward_module(net) if one_input else net
