"""Tracing: chain structure, breaks, skips, counts of the reference, errors."""

import json

import pytest

from layermerge import TraceError, build_space, load_model, trace
from layermerge.cli import main

from .conftest import USER_MODELS
from .helpers import check_plan_exact, prepare


@pytest.mark.parametrize(
    "spec,kwargs,blocks,options",
    [
        ("torchvision:resnet34", None, 62, 150),
        ("torchvision:mobilenet_v2", None, 171, 391),
        ("torchvision:mobilenet_v2", '{"width_mult": 1.4}', 171, 391),
    ],
)
def test_inspect_counts_match_the_reference(spec, kwargs, blocks, options, capsys):
    argv = ["inspect", spec, "--json"] + (["--model-kwargs", kwargs] if kwargs else [])
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["blocks"], out["options"]) == (blocks, options)
    for key in ("chain_length", "breaks", "skips"):
        assert key in out


def test_resnet34_chain_structure():
    chain = trace(load_model("torchvision:resnet34").model).chain
    assert chain.length == 32
    assert chain.frozen_outside == ["conv1"]
    assert chain.breaks == [7, 15, 27]  # outputs of the three stride-2 3x3 convs
    assert [(s.start, s.end) for s in chain.skips] == [(2 * i, 2 * i + 2) for i in range(16)]
    assert [s.start for s in chain.skips if s.projection] == [6, 14, 26]
    # shapes come from the real network, max-pool included (the reference's bug: 112x112)
    assert chain.nodes[0].shape == (64, 56, 56)
    assert chain.nodes[32].shape == (512, 7, 7)
    assert all(n.activation == "relu" for n in chain.nodes[1:])


def test_mobilenet_v2_chain_structure():
    chain = trace(load_model("torchvision:mobilenet_v2").model).chain
    assert chain.length == 50
    assert chain.frozen_outside == ["features.0.0", "features.18.0"]  # stem and 1x1 head
    # breaks after the projection 1x1 that follows each stride-2 depthwise conv
    assert chain.breaks == [5, 11, 20, 41]
    for b in chain.breaks:
        assert chain.conv(b).kernel == 1 and chain.conv(b - 1).stride == 2
    linear = [n.index for n in chain.nodes[1:] if n.activation is None]
    assert linear == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47, 50]
    assert chain.activation == "relu6"


def test_stem_and_head_can_join_the_chain_and_convs_can_be_frozen():
    model = load_model("torchvision:mobilenet_v2").model
    base = trace(model).chain
    full = trace(model, include_stem=True, include_head=True).chain
    assert full.length == base.length + 2 and full.frozen_outside == []
    frozen = trace(model, freeze=["features.2.conv.0.0"]).chain
    assert frozen.fingerprint() != base.fingerprint()
    space, space_f = build_space(base), build_space(frozen)
    assert len(space_f.options) < len(space.options) or all(
        c.irreducible for c in frozen.convs if c.path == "features.2.conv.0.0"
    )
    with pytest.raises(TraceError, match="do not exist"):
        trace(model, freeze=["no.such.conv"])


def test_squeeze_excitation_and_attention_become_breaks_and_stay_exact():
    model = load_model(f"{USER_MODELS}:se_attn").model
    _, traced, space = prepare(model, (3, 16, 16))
    chain = traced.chain
    paths = [c.path for c in chain.convs]
    # SE convs work on a pooled map and stay outside the chain; attention's 1x1 convs
    # are chain convs cut off by breaks (their neighbours are reshapes and matmuls)
    assert paths == ["a.0.0", "a.1.0", "b.0.0", "b.1.0", "attn.qkv", "attn.proj", "c.0.0", "c.1.0"]
    assert chain.breaks == [2, 4, 5]
    assert "ops between" in chain.nodes[2].break_reason  # the SE gate
    assert [(s.start, s.end) for s in chain.skips] == [(4, 6)]  # attention's residual
    assert all(len(space.options_of(s, e)) == 0 for s in (1, 3, 4) for e in (6, 7, 8))
    assert all(chain.nodes[b].break_reason for b in chain.breaks)
    for seed in range(5):
        check_plan_exact(traced, space.random_plan(seed), __import__("torch").float64)


def test_untraceable_model_error_names_the_module():
    model = load_model(f"{USER_MODELS}:untraceable").model
    with pytest.raises(TraceError) as e:
        trace(model, (3, 8, 8))
    msg = str(e.value)
    assert "body.1" in msg and "DataDependent" in msg


def test_untraceable_model_cli_error(capsys):
    assert main(["inspect", f"{USER_MODELS}:untraceable", "--input-shape", "3,8,8"]) == 2
    err = capsys.readouterr().err
    assert "body.1" in err and "Traceback" not in err


def test_fingerprint_depends_on_structure_not_weights():
    a = trace(load_model("layermerge:resnet8").model, (3, 32, 32)).chain
    b = trace(load_model("layermerge:resnet8").model, (3, 32, 32)).chain
    c = trace(load_model("layermerge:resnet8").model, (3, 16, 16)).chain
    d = trace(load_model("layermerge:resnet14").model, (3, 32, 32)).chain
    assert a.fingerprint() == b.fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3
