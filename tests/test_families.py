"""Every model family through one body: trace -> search space -> plans -> train-time
network -> merged deploy network (exact), verification, layer counts and a latency
table, all through the core API. The families are the fx-traced CNNs, the diffusers
UNets, and a toy family defined and registered here, which the core has never heard
of. Golden chain files catch any change to what tracing reads off a model."""

from __future__ import annotations

import copy
import difflib
import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from layermerge.chain import Chain, ConvSpec, Node
from layermerge.families.base import Family, TracedModel, copy_marks, mark
from layermerge.families.registry import (
    UnknownFamilyError,
    family_for_model,
    family_of,
    register_family,
    unregister_family,
)
from layermerge.latency import TimingConfig, build_latency_table, make_backend, predict_latency
from layermerge.models import load_model
from layermerge.plan import Plan, PlanBlock
from layermerge.space import SearchSpace, build_space, merged_geometry
from layermerge.trace import conv_weights, trace
from layermerge.transform import (
    TOLERANCE,
    apply,
    compare,
    count_layers,
    deploy_network,
    merge,
    randomize_batchnorm,
    verify,
)

from .helpers import SHAPE, small_unet, tiny_resnet

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("LAYERMERGE_REGEN_GOLDEN") == "1"
FAST = TimingConfig(
    warmup_runs=3, warmup_s=0.0, min_warmup_runs=1, min_runs=3, max_runs=6, max_time_s=0.02
)

# ---------------------------------------------------------------------------
# a third family, unknown to the library: a plain stack of 3x3 convs, each with a ReLU


class ToyNet(nn.Module):
    def __init__(self, in_channels: int = 2, width: int = 4, depth: int = 4):
        super().__init__()
        chans = [in_channels] + [width] * depth
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans, chans[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(depth))

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        return x


class ToyBlock(nn.Module):
    """One block of a plan at train time: the block's padding once, its kept convs
    unpadded, then its activation. The convs compose into one conv exactly."""

    def __init__(self, convs: Sequence[nn.Conv2d], pad: int, activation: bool):
        super().__init__()
        self.pad = pad
        self.convs = nn.ModuleList(convs)
        self.act = nn.ReLU() if activation else nn.Identity()

    def forward(self, x):
        x = F.pad(x, [self.pad] * 4)
        for conv in self.convs:
            x = conv(x)
        return self.act(x)


class ToyTrainNet(nn.Module):
    def __init__(self, blocks: Sequence[ToyBlock], spans: Sequence[tuple[int, int]]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.spans = list(spans)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class ToyDeployNet(nn.Sequential):
    pass


@dataclass(eq=False)
class ToyTraced(TracedModel):
    pass


def _compose(w1, b1, w2, b2):
    """The conv that is unpadded conv (w1, b1) followed by unpadded conv (w2, b2)
    (stride 1, dense): its kernel is the full convolution of the two kernels."""
    k2 = w2.shape[-1]
    w = F.conv2d(F.pad(w1.transpose(0, 1), [k2 - 1] * 4), w2.flip(-1, -2)).transpose(0, 1)
    return w, b2 + w2.sum(dim=(-1, -2)) @ b1


class ToyFamily(Family):
    name = "toy-stack"

    def claims(self, model):
        return isinstance(model, ToyNet)

    def default_input_shape(self, model):
        return (model.convs[0].in_channels, 8, 8)

    def trace(self, model, input_shape, *, include_stem=False, include_head=False, freeze=()):
        model = model.eval()
        shape = tuple(input_shape)
        x = torch.zeros(1, *shape, dtype=model.convs[0].weight.dtype)
        nodes, convs = [Node(0, None, shape)], []
        with torch.no_grad():
            for i, conv in enumerate(model.convs, 1):
                x = conv(x)
                path = f"convs.{i - 1}"
                nodes.append(Node(i, "relu", tuple(x.shape[1:])))
                convs.append(
                    ConvSpec(i, path, conv.in_channels, conv.out_channels, 3, 1, 1, 1, True,
                             frozen=path in freeze)
                )  # fmt: skip
        return ToyTraced(model, Chain(nodes, convs, [], shape, activation="relu"))

    def apply(self, traced, plan):
        blocks = []
        for b in plan.blocks:
            convs = []
            for i in b.kept_convs:
                conv = copy.deepcopy(traced.module(traced.chain.conv(i).path))
                conv.padding = (0, 0)
                convs.append(conv)
            blocks.append(
                ToyBlock(convs, merged_geometry(traced.chain, b.kept_convs)[2], b.activation)
            )
        net = ToyTrainNet(blocks, [(b.start, b.end) for b in plan.blocks])
        mark(net, self, plan, traced.input_shape)
        return net

    def merge(self, train_net):
        layers: list[nn.Module] = []
        for block in train_net.blocks:
            w, b = block.convs[0].weight.double(), block.convs[0].bias.double()
            for conv in block.convs[1:]:
                w, b = _compose(w, b, conv.weight.double(), conv.bias.double())
            dtype = block.convs[0].weight.dtype
            conv = nn.Conv2d(w.shape[1], w.shape[0], w.shape[-1], padding=block.pad).to(dtype)
            with torch.no_grad():
                conv.weight.copy_(w)
                conv.bias.copy_(b)
            layers += [conv, copy.deepcopy(block.act)]
        net = ToyDeployNet(*layers)
        copy_marks(train_net, net)
        return net.eval()

    def reinit_single_conv(self, train_net, option, chain):
        (conv,) = train_net.blocks[train_net.spans.index((option.start, option.end))].convs
        conv.reset_parameters()

    def count_layers(self, net):
        mods = list(net.modules())
        return {
            "convs": sum(isinstance(m, nn.Conv2d) for m in mods),
            "activations": sum(isinstance(m, nn.ReLU) for m in mods),
        }

    def option_module(self, traced, option):
        kernel, _, pad = merged_geometry(traced.chain, option.kept_convs)
        c_in = traced.chain.nodes[option.start].shape[0]
        conv = nn.Conv2d(c_in, traced.chain.conv(option.end).out_channels, kernel, padding=pad)
        return nn.Sequential(conv, nn.ReLU()) if option.activation else conv


ToyTraced.family = ToyFamily()


@pytest.fixture(scope="module")
def toy_family():
    family = register_family(ToyTraced.family)
    yield family
    unregister_family(family.name)


# ---------------------------------------------------------------------------
# the cases: one model of each family


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


def _small_unet():
    pytest.importorskip("diffusers")
    return small_unet()


CASES = {
    "cnn": Case(tiny_resnet, SHAPE),  # layermerge:resnet8, one channel, width 4
    "diffusers": Case(_small_unet, (1, 8, 8)),  # diffusers:ddpm-small at 8x8, two levels
    "toy": Case(ToyNet, (2, 8, 8)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, toy_family):
    torch.manual_seed(0)
    c = CASES[request.param]
    model = c.make()
    # float64, BatchNorm statistics random: merging must be exact, not nearly so
    model64 = randomize_batchnorm(copy.deepcopy(model).double().eval(), 0)
    traced = trace(model64, c.input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    return request.param, c, model, traced, space


def _identity_plan(space: SearchSpace) -> Plan:
    """Every conv its own block, kept (where a conv may be pruned to nothing,
    ``space.identity_plan()`` currently takes that option)."""
    n = space.chain.length
    return space.plan(
        [
            next(o for o in space.options_of(i - 1, i) if o.kept_convs == (i,))
            for i in range(1, n + 1)
        ]
    )


def _plans(space: SearchSpace) -> list[Plan]:
    rng = random.Random(0)
    return [_identity_plan(space), space.deepest_plan()] + [
        space.random_plan(rng) for _ in range(2)
    ]


def _with(space: SearchSpace, option: PlanBlock) -> Plan:
    """The identity plan with ``option`` in place of the blocks it covers."""
    rest = [b for b in _identity_plan(space).blocks if not option.start <= b.start < option.end]
    return space.plan(sorted([*rest, option], key=lambda b: b.start))


def test_trace_reads_a_chain_the_space_can_use(case):
    name, c, model, traced, space = case
    family = family_of(traced)
    assert family is family_for_model(model)
    assert (family is ToyTraced.family) == (name == "toy")
    chain = traced.chain
    assert traced.input_shape == c.input_shape == tuple(chain.input_shape)
    assert chain.length >= 4 and len(chain.nodes) == chain.length + 1
    assert traced.fingerprint == chain.fingerprint()
    for conv in chain.convs:
        assert isinstance(traced.module(conv.path), nn.Conv2d), conv.path
    assert sorted(conv_weights(traced)) == list(range(1, chain.length + 1))
    assert space.options and any(o.length > 1 for o in space.options)
    # the model's own counts hold at least the chain
    base = count_layers(model)
    assert base["convs"] >= chain.length
    assert base["activations"] >= sum(n.activation is not None for n in chain.nodes)
    if name == "toy":
        assert base == {"convs": 4, "activations": 4}


def test_plans_apply_and_merge_exactly(case):
    name, c, _, traced, space = case
    family = family_of(traced)
    tol = TOLERANCE[torch.float64]
    base = count_layers(traced.model)
    for k, plan in enumerate(_plans(space)):
        train_net = apply(traced, plan)
        assert family_of(train_net) is family
        deploy = merge(train_net)  # verified: raises unless exact
        assert family_of(deploy) is family and not deploy.training
        err = compare(train_net, deploy, seed=k)
        assert err["max_rel_err"] <= tol, (k, err)
        counts = count_layers(deploy)
        assert counts["convs"] <= base["convs"] and counts["activations"] <= base["activations"]
        if k == 0:  # the identity plan computes what the model does
            assert counts == base
            err = compare(deploy, traced.model, input_shape=c.input_shape)
            assert err["max_rel_err"] <= tol, err
        if k == 1:  # the deepest plan merges something
            assert counts["convs"] < base["convs"]
        # the one function from (model, plan, weights) to a deploy network
        again = deploy_network(traced, plan, train_net.state_dict())
        assert compare(deploy, again)["max_abs_err"] == 0.0
        one = deploy_network(traced, plan, train_net.state_dict(), one_input=True)
        x = torch.randn(2, *c.input_shape, dtype=torch.float64)
        with torch.no_grad():
            y = one(x)
        assert isinstance(y, torch.Tensor) and y.shape[0] == 2


def test_verify(case):
    _, _, _, traced, space = case
    plans = _plans(space)
    res = verify(traced, plans)
    assert res["failures"] == [] and res["plans"] == len(plans)
    assert res["max_rel_err"] <= TOLERANCE[torch.float64]


def test_reinit_single_conv(case):
    _, _, _, traced, space = case
    # a span of several convs reduced to one, with other blocks around it
    option = max(
        (o for o in space.options if len(o.kept_convs) == 1 and 1 < o.length < space.chain.length),
        key=lambda o: (o.length, o.start),
    )
    train_net = apply(traced, _with(space, option)).eval()
    family = family_of(train_net)
    x = family.example_inputs(train_net, 2, generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in train_net.state_dict().items()}
    with torch.no_grad():
        y0 = family.output_tensor(train_net(*x))
    family.reinit_single_conv(train_net, option, traced.chain)
    after = train_net.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and len(changed) < len(before)
    with torch.no_grad():
        assert not torch.equal(y0, family.output_tensor(train_net(*x)))


def test_latency_table(case, tmp_path):
    name, c, model, _, _ = case
    traced = trace(copy.deepcopy(model).float().eval(), c.input_shape)
    space = build_space(traced.chain, conv_weights(traced))
    table = build_latency_table(
        traced, tmp_path / "lat.csv", make_backend(backend="torch"), timing=FAST, model=name,
        progress=False,
    )  # fmt: skip
    assert sorted(table.keys()) == sorted(o.key for o in space.options)
    assert all(r["latency_ms"] >= 0 for r in table.rows)
    assert table.meta["complete"] is True
    # the table's constant makes the prediction of its identity plan the measured
    # latency; where the entries add up to more than the network (timing noise on a
    # network this small) the constant is clamped at 0 and the sidecar records by
    # how much the identity plan is then predicted above its measured time
    identity = space.identity_plan()
    meta = table.meta
    assert meta["constant_ms"] >= 0
    over = -meta.get("constant_raw_ms", 0.0)
    assert over >= 0
    assert predict_latency(table, identity) == pytest.approx(meta["identity_ms"] + over)


def test_toy_family_only_while_registered(toy_family):
    assert family_for_model(ToyNet()) is toy_family
    unregister_family(toy_family.name)
    try:
        try:
            other = family_for_model(ToyNet())
        except UnknownFamilyError:
            other = None
        assert other is not toy_family
    finally:
        register_family(toy_family)


# ---------------------------------------------------------------------------
# golden chains: LAYERMERGE_REGEN_GOLDEN=1 rewrites them (then review the diff)

GOLDEN_MODELS = {
    "resnet18": ("torchvision:resnet18", (3, 224, 224)),
    "ddpm-small": ("diffusers:ddpm-small", (1, 32, 32)),
}


def _chain_json(spec: str, input_shape: tuple[int, ...]) -> str:
    traced = trace(load_model(spec, input_shape=input_shape).model, input_shape)
    doc = {
        "model": spec,
        "input_shape": list(input_shape),
        "fingerprint": traced.fingerprint,
        "chain": traced.chain.to_dict(),
    }
    return _golden_text(doc)


def _golden_text(doc: dict) -> str:
    """JSON with one line per node, conv and skip: a change to tracing is a short diff."""

    def item(key, value, depth):
        pad = " " * depth
        if isinstance(value, dict):
            inner = ",\n".join(item(k, v, depth + 1) for k, v in value.items())
            return f"{pad}{json.dumps(key)}: {{\n{inner}\n{pad}}}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            inner = ",\n".join(f"{pad} {json.dumps(v)}" for v in value)
            return f"{pad}{json.dumps(key)}: [\n{inner}\n{pad}]"
        return f"{pad}{json.dumps(key)}: {json.dumps(value)}"

    return "{\n" + ",\n".join(item(k, v, 1) for k, v in doc.items()) + "\n}\n"


@pytest.mark.parametrize("name", list(GOLDEN_MODELS))
def test_chain_matches_golden_file(name):
    spec, shape = GOLDEN_MODELS[name]
    if spec.startswith("diffusers:"):
        pytest.importorskip("diffusers")
    path = GOLDEN / f"chain_{name}.json"
    got = _chain_json(spec, shape)
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run with LAYERMERGE_REGEN_GOLDEN=1 to write it"
    want = path.read_text()
    if json.loads(got) != json.loads(want):
        diff = difflib.unified_diff(
            want.splitlines(), got.splitlines(), str(path), "traced now", lineterm="", n=2
        )
        lines = list(diff)
        pytest.fail(
            f"the chain of {spec} at {shape} differs from {path.name} "
            f"(LAYERMERGE_REGEN_GOLDEN=1 rewrites it if the change is intended):\n"
            + "\n".join(lines[:80])
            + (f"\n... {len(lines) - 80} more lines" if len(lines) > 80 else "")
        )
