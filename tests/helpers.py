"""Shared test helpers (imported by tests, not collected)."""

from __future__ import annotations

import gc

import torch

from layermerge import apply, build_space, conv_weights, count_layers, merge, trace
from layermerge.transform import TOLERANCE, compare, randomize_batchnorm


def prepare(model, input_shape, dtype=torch.float64, seed=0, **trace_kw):
    model = randomize_batchnorm(model.to(dtype).eval(), seed)
    traced = trace(model, input_shape, **trace_kw)
    return model, traced, build_space(traced.chain, conv_weights(traced))


def expected_counts(model, traced, plan) -> dict[str, int]:
    """Convs and activations the deploy network of ``plan`` must hold: one conv per
    block (projections inside a block fold into it), activations at block ends only."""
    chain = traced.chain
    orig = count_layers(traced.gm)
    inner_proj = sum(
        1
        for sk in chain.skips
        if sk.projection and any(b.start <= sk.start and sk.end <= b.end for b in plan.blocks)
    )
    convs = orig["convs"] - chain.length - inner_proj + len(plan.blocks)
    chain_acts = sum(1 for n in chain.nodes[1:] if n.activation)
    kept = 0
    for b in plan.blocks:
        has = chain.nodes[b.end].activation is not None
        if b.activation and (has or (b.length > 1 and chain.activation)):
            kept += 1
    return {"convs": convs, "activations": orig["activations"] - chain_acts + kept}


def check_plan_exact(traced, plan, dtype) -> float:
    """Apply + merge ``plan``; assert exactness and layer counts; return the error."""
    gc.collect()  # GraphModule copies hold reference cycles (see transform.verify)
    train_net = apply(traced, plan)
    deploy = merge(train_net, verify=False)
    err = compare(train_net, deploy)
    assert err["max_rel_err"] <= TOLERANCE[dtype], (plan.to_dict(), err)
    assert count_layers(deploy) == expected_counts(None, traced, plan), plan.to_dict()
    return err["max_rel_err"]
