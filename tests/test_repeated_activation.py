"""A dropped conv whose node adds nothing leaves its activation right after the same
activation of the node before (``relu6(relu6(x))``). The deploy network omits the
repeat (exactly), and the latency prediction charges such a drop nothing, however
an older table priced it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from layermerge import apply, merge, trace
from layermerge.chain import repeats_activation
from layermerge.costs import block_latency_ms, drop_repeats_activation
from layermerge.families.base import owned_skips
from layermerge.families.fx_transform import drop_repeated_activations
from layermerge.latency.entries import dropped_block
from layermerge.models import load_model
from layermerge.plan import Plan
from layermerge.space import build_space
from layermerge.tables import make_table
from layermerge.transform import compare, count_layers

from .helpers import SHAPE, expected_counts


def _repeats(chain) -> list[int]:
    return [
        i
        for i in range(1, chain.length + 1)
        if not chain.conv(i).irreducible
        and not owned_skips(chain, dropped_block(chain, i))
        and repeats_activation(chain.nodes[i - 1].activation, chain.nodes[i].activation)
    ]


def _drop_all(traced) -> Plan:
    chain = traced.chain
    space = build_space(chain)
    blocks = [
        dropped_block(chain, b.end) if not chain.conv(b.end).irreducible else b
        for b in space.identity_plan().blocks
    ]
    return Plan(space.fingerprint, chain.length, blocks, method="layerprune")


@pytest.mark.parametrize(
    "spec,kw,shape,stem_act",
    [
        ("layermerge:resnet20", {"in_chans": 1, "width": 4}, SHAPE, "relu"),
        ("layermerge:mobilenetv2_mini", {"in_chans": 1}, (1, 16, 16), "relu6"),
    ],
)
def test_the_deploy_network_omits_repeated_activations_exactly(spec, kw, shape, stem_act):
    torch.manual_seed(0)
    traced = trace(load_model(spec, kw).model.eval(), shape)
    chain = traced.chain
    # the chain's node 0 follows the stem's activation, which the chain does not record
    repeats = _repeats(chain) + [1] * (
        not chain.conv(1).irreducible and chain.nodes[1].activation == stem_act
    )
    assert len(repeats) >= 2, "droppable convs whose nodes only repeat an activation"
    plan = _drop_all(traced)
    train_net = apply(traced, plan).eval()
    deploy = merge(train_net)  # verified against the train-time network
    assert compare(train_net, deploy)["max_rel_err"] <= 1e-5
    counts = count_layers(deploy)
    assert counts == expected_counts(None, traced, plan, input_activation=stem_act)
    # the train-time network still applies every activation; the deploy one fewer each
    assert count_layers(train_net)["activations"] - counts["activations"] == len(repeats)
    assert drop_repeated_activations(deploy) == 0  # nothing left to remove


def test_an_activation_after_another_kind_is_kept():
    assert repeats_activation("relu6", "relu6") and repeats_activation("relu", "relu")
    assert not repeats_activation("relu", "relu6")
    assert not repeats_activation(None, "relu")
    # not idempotent: silu(silu(x)) != silu(x)
    assert not repeats_activation("silu", "silu")
    assert not repeats_activation("leaky_relu", "leaky_relu")


def test_a_repeat_is_priced_at_nothing_even_by_a_table_that_timed_it():
    torch.manual_seed(0)
    model = load_model("layermerge:resnet20", {"in_chans": 1, "width": 4}).model
    traced = trace(model.eval(), SHAPE)
    chain = traced.chain
    space = build_space(chain)
    repeats = _repeats(chain)
    others = [
        i for i in range(1, chain.length + 1) if not chain.conv(i).irreducible and i not in repeats
    ]
    assert repeats and others
    rows = []
    for o, key in zip(space.options, space.option_rows()):
        skips = ";".join(f"{k.start}-{k.end}" for k in owned_skips(chain, o))
        act = chain.nodes[o.end].activation or ""
        rows.append(key | {"latency_ms": 1.0, "activation": act, "skips": skips})
    stale = {str(i): 0.3 for i in range(1, chain.length + 1) if not chain.conv(i).irreducible}
    meta = {**space.table_meta(), "constant_ms": 0.0, "dropped_ms": stale}
    table = make_table(
        "latency",
        rows,
        meta,
        columns=(*space.option_rows()[0], "latency_ms", "activation", "skips"),
    )
    for i in repeats:
        assert drop_repeats_activation(table, i)
        assert block_latency_ms(table, dropped_block(chain, i)) == 0.0
    for i in others:
        assert not drop_repeats_activation(table, i)
        assert block_latency_ms(table, dropped_block(chain, i)) == 0.3


def test_the_table_build_times_no_repeat():
    from layermerge.latency import make_backend
    from layermerge.latency.entries import _measure_dropped

    from .test_latency_model import FAST

    torch.manual_seed(0)
    model = load_model("layermerge:resnet20", {"in_chans": 1, "width": 4}).model
    traced = trace(model.eval(), SHAPE)
    chain = traced.chain
    n = torch.get_num_threads()
    dropped = _measure_dropped(
        traced, make_backend(backend="torch"), build_space(chain), replace(FAST, flush_mb=0.0)
    )
    torch.set_num_threads(n)
    repeats = _repeats(chain)
    assert repeats and all(dropped[str(i)] == 0.0 for i in repeats)
    # a drop at a node with a residual add still leaves work: relu(x + skip)
    # (conv 1 follows the stem's activation, which the chain does not record: timed)
    adds = [int(k) for k in dropped if int(k) not in repeats and int(k) != 1]
    assert adds and all(owned_skips(chain, dropped_block(chain, i)) for i in adds)
    assert sum(dropped[str(i)] for i in adds) > 0
