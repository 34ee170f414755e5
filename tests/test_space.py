"""Search space and plans: options, kept convs, random plans, plan files and checks."""

import collections
import itertools
import json

import pytest
import torch

from layermerge import Plan, PlanBlock, PlanError, build_space, conv_weights, load_model, trace
from layermerge.space import block_is_valid

from .conftest import USER_MODELS


@pytest.fixture(scope="module")
def resnet8():
    traced = trace(load_model("layermerge:resnet8").model, (3, 16, 16))
    return traced, build_space(traced.chain, conv_weights(traced))


def _all_plans(space):
    """Brute force: every partition of 0..L into valid blocks, every option."""
    L = space.chain.length
    out = []

    def rec(pos, acc):
        if pos == L:
            out.append(tuple(acc))
            return
        for e in range(pos + 1, L + 1):
            for o in space.options_of(pos, e):
                rec(e, acc + [o.key])

    rec(0, [])
    return out


def test_block_validity_rules(resnet8):
    traced, space = resnet8
    chain = traced.chain  # skips (0,2) (2,4 proj) (4,6 proj); breaks at 3 and 5
    assert chain.breaks == [3, 5]
    assert block_is_valid(chain, 0, 2) and block_is_valid(chain, 1, 2)
    assert not block_is_valid(chain, 1, 3)  # partial overlap with skip (0, 2)
    assert not block_is_valid(chain, 0, 3)  # partial overlap with skip (2, 4)
    assert not block_is_valid(chain, 2, 5)  # spans the break at 3
    for s, e in itertools.combinations(range(chain.length + 1), 2):
        assert (len(space.options_of(s, e)) > 0) == block_is_valid(chain, s, e)


def test_options_kernel_stride_and_irreducible_convs(resnet8):
    traced, space = resnet8
    # block (0, 2): two prunable 3x3 convs -> keep 1 (K=3) or 2 (K=5)
    assert [(o.kernel, o.kept_convs) for o in space.options_of(0, 2)][1] == (5, (1, 2))
    one = space.options_of(0, 2)[0]
    assert one.kernel == 3 and len(one.kept_convs) == 1
    # kept conv chosen by the largest L1 norm
    w = conv_weights(traced)
    best = max((1, 2), key=lambda i: float(w[i].detach().abs().sum()))
    assert one.kept_convs == (best,)
    # block (2, 3): conv 3 is strided (irreducible): only option keeps it
    assert [o.kept_convs for o in space.options_of(2, 3)] == [(3,)]
    assert all(o.stride == 2 for o in space.options_of(2, 4))


def test_random_plans_are_uniform(resnet8):
    _, space = resnet8
    plans = _all_plans(space)
    assert len(plans) == space.count_plans()[-1]
    n = 40 * len(plans)
    rng = __import__("random").Random(0)
    counts = collections.Counter(
        tuple(b.key for b in space.random_plan(rng).blocks) for _ in range(n)
    )
    assert set(counts) == set(plans)
    # chi-square against the uniform distribution (df = len-1; generous bound)
    exp = n / len(plans)
    chi2 = sum((counts[p] - exp) ** 2 / exp for p in plans)
    assert chi2 < 2 * len(plans) + 30, chi2


def test_plan_json_round_trip_and_fingerprint_check(tmp_path, resnet8):
    traced, space = resnet8
    plan = space.random_plan(1)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["schema"] == 1
    space.check_plan(again)
    other = build_space(trace(load_model("layermerge:resnet14").model, (3, 16, 16)).chain)
    with pytest.raises(PlanError, match="fingerprint"):
        other.check_plan(again)


def test_plan_errors(tmp_path, resnet8):
    _, space = resnet8
    fp, L = space.fingerprint, space.chain.length
    with pytest.raises(PlanError, match="partition"):
        Plan(fp, L, [PlanBlock(0, 2, 5, 1, False, (1, 2))])
    with pytest.raises(PlanError, match="outside the span"):
        PlanBlock(0, 2, 5, 1, False, (1, 3))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(bad)
    bad.write_text(json.dumps({"kind": "layermerge-plan", "schema": 99}))
    with pytest.raises(PlanError, match="schema 99"):
        Plan.load(bad)
    # a block that spans a break, and one that prunes an irreducible conv
    blocks = [o for o in space.identity_plan().blocks]
    with pytest.raises(PlanError, match="not a valid block"):
        space.check_plan(Plan(fp, L, [PlanBlock(0, 4, 7, 2, False, (1, 2, 3, 4))] + blocks[4:]))
    with pytest.raises(PlanError, match="keeps no conv"):
        space.check_plan(Plan(fp, L, blocks[:2] + [PlanBlock(2, 3, 1, 1, False, ())] + blocks[3:]))
    plain = build_space(trace(load_model(f"{USER_MODELS}:plain").model, (3, 16, 16)).chain)
    assert plain.chain.conv(3).irreducible  # 8 -> 16 channels
    rest = plain.identity_plan().blocks[3:]
    with pytest.raises(PlanError, match="prunes conv 3, which is irreducible"):
        plain.check_plan(
            Plan(
                plain.fingerprint, plain.chain.length, [PlanBlock(0, 3, 7, 1, False, (1, 2))] + rest
            )
        )
    with pytest.raises(PlanError, match="merge into kernel=5"):
        space.check_plan(Plan(fp, L, [PlanBlock(0, 2, 3, 1, False, (1, 2))] + blocks[2:]))


def test_options_csv_has_sidecar(tmp_path, resnet8):
    _, space = resnet8
    path = space.write_options_csv(tmp_path / "space.csv")
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[:6] == [
        "start",
        "end",
        "kernel",
        "stride",
        "depthwise",
        "kept_convs",
    ]
    assert len(lines) == 1 + len(space.options)
    meta = json.loads((tmp_path / "space.csv.meta.json").read_text())
    assert meta["model_fingerprint"] == space.fingerprint
    assert meta["chain_length"] == space.chain.length
    assert meta["input_shape"] == [3, 16, 16]


def test_deepest_plan_keeps_every_conv_in_the_longest_blocks():
    traced = trace(load_model(f"{USER_MODELS}:plain").model, (3, 16, 16))
    space = build_space(traced.chain)
    plan = space.deepest_plan()
    assert plan.kept_convs == list(range(1, traced.chain.length + 1))
    assert all(b.end in traced.chain.breaks + [traced.chain.length] for b in plan.blocks)
    assert torch.is_tensor(conv_weights(traced)[1])
