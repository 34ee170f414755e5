"""apply / merge / verify: exactness over models and random plans, layer counts,
training of the train-time network."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge import MergeVerificationError, apply, load_model, merge
from layermerge.transform import TOLERANCE, compare

from .assets.random_cnn import RandomCNN, architectures
from .conftest import USER_MODELS
from .helpers import check_plan_exact, prepare

# (spec, kwargs, input shape, random plans in float64, random plans in float32). Every
# plan copies the whole network, so the largest models get the fewest plans: a plan of
# VGG-16-BN in float64 copies 1.1 GB of weights (about 3.5 s a plan on the CI machine).
# The random architectures of test_property_random_architectures_and_plans cover the
# variety of plans; these check that real models' graphs trace and merge exactly.
MODELS = [
    ("torchvision:resnet18", {}, (3, 32, 32), 20, 6),
    ("torchvision:resnet34", {}, (3, 32, 32), 10, 4),
    ("torchvision:mobilenet_v2", {}, (3, 32, 32), 20, 6),
    ("torchvision:vgg16_bn", {}, (3, 32, 32), 8, 3),
    ("timm:mobilenetv3_small_050", {}, (3, 32, 32), 20, 6),
    (f"{USER_MODELS}:plain", {}, (3, 16, 16), 30, 10),
    (f"{USER_MODELS}:se_attn", {}, (3, 16, 16), 30, 10),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize(
    "spec,kwargs,shape,n64,n32", MODELS, ids=[m[0].split("/")[-1] for m in MODELS]
)
def test_random_plans_merge_exactly(spec, kwargs, shape, n64, n32, dtype):
    model = load_model(spec, kwargs).model
    _, traced, space = prepare(model, shape, dtype)
    rng = random.Random(1)
    n = n64 if dtype == torch.float64 else n32
    plans = [space.identity_plan(), space.deepest_plan()] + [
        space.random_plan(rng) for _ in range(n)
    ]
    # the plans are not all trivial: some merge long spans and prune convs
    longest = max(o.end - o.start for o in space.options)
    assert max(max(b.length for b in p.blocks) for p in plans) >= min(3, longest)
    assert any(len(p.kept_convs) < p.chain_length for p in plans)
    worst = max(check_plan_exact(traced, p, dtype) for p in plans)
    assert worst <= TOLERANCE[dtype]


def test_identity_plan_is_the_original_network():
    model, traced, space = prepare(load_model("torchvision:resnet18").model, (3, 32, 32))
    train_net = apply(traced, space.identity_plan())
    assert compare(model, train_net, input_shape=(3, 32, 32))["max_abs_err"] == 0.0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), seed=st.integers(0, 2**31 - 1))
def test_property_random_architectures_and_plans(arch, seed):
    """Any architecture of residual units with mixed kernels/depthwise/strides/skips,
    any uniformly random plan: the merged network equals the train-time network."""
    _, traced, space = prepare(RandomCNN(arch), (3, 12, 12), seed=seed % 1000, include_head=True)
    check_plan_exact(traced, space.random_plan(seed), torch.float64)
    check_plan_exact(traced, space.deepest_plan(), torch.float64)


def test_merge_holds_one_conv_per_block_and_depthwise_stays_depthwise():
    _, traced, space = prepare(load_model("torchvision:mobilenet_v2").model, (3, 32, 32))
    # a block made of one depthwise conv and a dense 1x1 block
    plan = space.deepest_plan()
    deploy = merge(apply(traced, plan))
    mods = dict(deploy.named_modules())
    for b in plan.blocks:
        conv = mods[f"lm_block_{b.start}_{b.end}"]
        assert isinstance(conv, torch.nn.Conv2d)
        assert conv.kernel_size == (b.kernel, b.kernel) and conv.stride == (b.stride, b.stride)
        if b.depthwise:
            assert conv.groups == conv.in_channels == conv.out_channels
    assert any(b.depthwise for b in space.identity_plan().blocks)
    deploy_id = merge(apply(traced, space.identity_plan()))
    dw = [m for m in deploy_id.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(dw) == 17  # every depthwise conv of MobileNetV2 stays depthwise


def test_merge_detects_a_wrong_merge(monkeypatch):
    _, traced, space = prepare(load_model("layermerge:resnet8").model, (3, 16, 16))
    plan = space.deepest_plan()
    train_net = apply(traced, plan)
    merge(train_net)  # fine
    # a merge that gets the kernel slightly wrong: the self-check must catch it
    import layermerge.families.fx_transform as fx_transform

    orig = fx_transform.merge_block

    def broken(tb, cin, block):
        conv = orig(tb, cin, block)
        with torch.no_grad():
            conv.weight.add_(1e-2)
        return conv

    monkeypatch.setattr(fx_transform, "merge_block", broken)
    with pytest.raises(MergeVerificationError, match="relative error"):
        merge(train_net)


@pytest.mark.parametrize(
    "spec,shape", [("layermerge:resnet8", (3, 16, 16)), ("torchvision:mobilenet_v2", (3, 32, 32))]
)
def test_train_time_network_trains(spec, shape):
    kwargs = {"width_mult": 0.25} if "mobilenet" in spec else {}
    model = load_model(spec, kwargs).model.float()
    _, traced, space = prepare(model, shape, dtype=torch.float32)
    plan = space.random_plan(3)
    assert any(b.length > 1 for b in plan.blocks)
    net = apply(traced, plan).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for step in range(10):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        if step == 0:
            missing = [
                n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
            ]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # after training, the trained train-time network still merges exactly (float32)
    err = compare(net.eval(), merge(net))
    assert err["max_rel_err"] <= TOLERANCE[torch.float32]


def test_identity_blocks_with_inplace_activations_train_and_merge():
    """Layer pruning drops convs (identity blocks); the original network's in-place
    ReLUs must not then overwrite a tensor a skip still reads."""
    from layermerge import Plan, PlanBlock

    _, traced, space = prepare(
        load_model("layermerge:resnet8").model.float(), (3, 16, 16), dtype=torch.float32
    )
    blocks = [PlanBlock(0, 1, 1, 1, False, ()), PlanBlock(1, 2, 1, 1, False, ())]
    blocks += space.identity_plan().blocks[2:]
    plan = Plan(space.fingerprint, space.chain.length, blocks, method="layerprune")
    net = apply(traced, plan).train()
    x = torch.randn(4, 3, 16, 16)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()
    deploy = merge(net)
    assert compare(net, deploy)["max_rel_err"] <= TOLERANCE[torch.float32]
    # the dropped convs are gone from the deploy network
    assert sum(isinstance(m, torch.nn.Conv2d) for m in deploy.modules()) == (
        sum(isinstance(m, torch.nn.Conv2d) for m in traced.model.modules()) - 2
    )
