"""Structured channel pruning with torch-pruning (layermerge.channelprune) and the
compress method ``channelprune`` that compares it with LayerMerge."""

import json
import sys

import pytest
import torch
from torch import nn

from layermerge import load_model
from layermerge.channelprune import (
    MISSING,
    available,
    count_macs,
    count_params,
    find_ratio,
    load_pruned,
    prune_channels,
)
from layermerge.pipeline import ConfigError, compress, parse_config
from layermerge.train import save_state_dict
from layermerge.transform import randomize_batchnorm

from .helpers import write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")
#: every test but the one of a missing torch-pruning needs it (the [prune] extra)
needs_tp = pytest.mark.skipif(not available(), reason="needs torch-pruning ([prune] extra)")

SHAPE = (1, 16, 16)
CLASSES = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = load_model("layermerge:resnet20", {"in_chans": 1, "width": 8, "num_classes": CLASSES})
    return randomize_batchnorm(m.model.eval(), seed=0)


def x(batch=1, seed=0):
    return torch.randn(batch, *SHAPE, generator=torch.Generator().manual_seed(seed))


def convs(net):
    return [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_tp
def test_pruning_is_deterministic_and_rebuilds_from_a_state_dict(model, tmp_path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = prune_channels(model, 0.4, x())
    b = prune_channels(model, 0.4, x())
    assert convs(a) == convs(b) and convs(a) != convs(model)
    assert same_state(a, b)
    # the model pruned from is left as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # "fine-tuned" weights, saved as safetensors, back onto the base network pruned again
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_state_dict(a, tmp_path / "pruned.safetensors")
    c = load_pruned(model, 0.4, x(), tmp_path / "pruned.safetensors")
    assert same_state(a, c)
    assert torch.equal(a(x(3, seed=1)), c(x(3, seed=1)))
    # weights of another ratio do not fit: a clear error, not a silent half-load
    with pytest.raises(ValueError, match="do not fit the network pruned at ratio 0.2"):
        load_pruned(model, 0.2, x(), tmp_path / "pruned.safetensors")


@needs_tp
def test_a_frozen_model_prunes_as_a_trainable_one(model):
    # a distillation teacher has requires_grad off: torch-pruning reads the couplings
    # off the autograd graph, which must not change what is pruned
    frozen = prune_channels(model, 0.0, x()).requires_grad_(False)
    a, b = prune_channels(model, 0.4, x()), prune_channels(frozen, 0.4, x())
    assert convs(a) == convs(b) and same_state(a, b)
    assert not any(p.requires_grad for p in b.parameters())  # the flags are kept


@needs_tp
def test_ratio_zero_keeps_the_network_and_larger_ratios_shrink_it(model):
    inp = x(2, seed=3)
    same = prune_channels(model, 0.0, x())
    assert convs(same) == convs(model) and torch.equal(same(inp), model(inp))
    params, macs = [], []
    for ratio in (0.0, 0.2, 0.5, 0.95):
        net = prune_channels(model, ratio, x())
        params.append(count_params(net))
        macs.append(count_macs(net, x()))
        # the classifier keeps its width; every layer keeps at least one channel
        assert net.fc.out_features == CLASSES and net(inp).shape == (2, CLASSES)
        assert min(convs(net)) >= 1
    assert params == sorted(params, reverse=True) and len(set(params)) == len(params)
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)


@needs_tp
def test_ignored_layers_keep_their_width(model):
    net = prune_channels(model, 0.5, x(), ignored=["conv1", model.fc])
    assert net.conv1.out_channels == model.conv1.out_channels
    assert net.fc.out_features == CLASSES
    with pytest.raises(ValueError, match="not modules of the model"):
        prune_channels(model, 0.5, x(), ignored=["nope"])


@needs_tp
def test_find_ratio_bisects_to_the_smallest_ratio_within_the_budget(model):
    base = count_params(model)
    budget = 0.5 * base
    trials = []
    found = find_ratio(model, x(), budget, count_params, trials=trials)
    assert found.measured_ms <= budget
    assert count_params(prune_channels(model, found.ratio, x())) == found.measured_ms
    # 1 + 1 + 8 measurements: the ends, then 8 halvings of [0, 0.95]
    assert [t["ratio"] for t in trials[:2]] == [0.0, 0.95] and len(trials) == 10
    # monotone: ratios over the budget only rise, ratios within it only fall
    over = [t["ratio"] for t in trials if not t["within"]]
    within = [t["ratio"] for t in trials if t["within"]]
    assert over == sorted(over) and within == sorted(within, reverse=True)
    assert found.ratio == min(within) and found.ratio - max(over) <= 0.95 / 2**8 + 1e-12
    # no slack: the ratio just under it measures over the budget
    assert count_params(prune_channels(model, max(over), x())) > budget
    # a budget the unpruned network meets: ratio 0, and a known latency is not measured
    seen = []
    assert find_ratio(model, x(), base, count_params, low_ms=base, trials=seen) == (0.0, base)
    assert seen == []
    # one no ratio meets: the largest, measured over the budget
    ratio, ms = find_ratio(model, x(), 1.0, count_params)
    assert ratio == 0.95 and ms > 1.0


def test_missing_torch_pruning_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    assert "pip install 'layermerge[prune]'" in MISSING
    with pytest.raises(
        ImportError, match=r"needs torch-pruning: pip install 'layermerge\[prune\]'"
    ):
        prune_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten()), 0.5, x())
    cfg = {"model": "layermerge:resnet8", "data": "fashion-mnist"}
    with pytest.raises(ConfigError, match=r"channelprune needs torch-pruning"):
        parse_config({**cfg, "solve": {"methods": ["layermerge", "channelprune"]}})
    parse_config(cfg)  # the other methods do not need it
    with pytest.raises(ConfigError, match="unknown.*channelprune"):
        parse_config({**cfg, "solve": {"methods": ["layermerge", "chanelprune"]}})


# --------------------------------------------------------------------------- compress


def tiny_config(data) -> dict:
    return {
        "model": "layermerge:resnet8",
        "model_kwargs": {"in_chans": 1, "width": 8, "num_classes": CLASSES},
        "input_shape": list(SHAPE),
        "data": f"fashion-mnist:{data}",
        "train": {"steps": 8, "batch_size": 32, "lr": 0.05},
        "latency": {"backends": ["onnxruntime", "torch"], "max_time_s": 0.02},
        "importance": {"holdout_per_class": 4, "steps": 1, "batch_size": 40},
        "solve": {
            "methods": ["layermerge", "channelprune"],
            "budgets": [0.95],
            "precision": 10000,
        },
        "finetune": {"steps": 3, "batch_size": 32, "lr": 0.01, "distill": 0.5},
        "export": {"formats": ["onnx"]},
        "benchmark": {"rounds": 2, "calls_per_round": 2, "max_time_s": 3},
    }


@needs_tp
def test_compress_compares_channel_pruning_in_the_same_pool(tmp_path):
    import layermerge as lm
    from layermerge.export import load_onnx, run_onnx

    data = write_mnist_like(tmp_path / "data", size=SHAPE[-1], classes=CLASSES)
    cfg = parse_config(tiny_config(data))
    rd = tmp_path / "run"
    compress(cfg, rd, log=lambda m: None)
    report = json.loads((rd / "report.json").read_text())
    assert sorted(r["method"] for r in report["rows"]) == ["channelprune", "layermerge"]
    (row,) = [r for r in report["rows"] if r["method"] == "channelprune"]
    assert row["kind"] == "network" and row["predicted_ms"] is None and row["plan"] is None
    # the search measured a network within its budget (a fraction of the base's latency)
    assert 0 < row["ratio"] <= 0.95 and row["search"]["within_budget"]
    assert row["search_ms"] <= row["budget_ms"] == pytest.approx(0.95 * row["search"]["base_ms"])
    assert row["search"]["pruning"]["torch_pruning"]
    assert 0 < row["params"] < report["base"]["params"]
    assert row["search"]["macs"]["pruned"] < row["search"]["macs"]["base"]
    assert 0 <= row["accuracy"] <= 100 and row["seeds"] == 1
    # timed in the one pool per backend, beside the base and every plan
    for b in ("onnxruntime", "torch"):
        assert row["measured_ms_by_backend"][b] > 0
        assert row["benchmarks"][b]["baseline_ms"] == report["timing_pool"][b]["base_ms"]
        assert report["timing_pool"][b]["networks"] == 1 + len(
            {r["digest"] for r in report["rows"]}
        )
    stages = json.loads((rd / "stages.json").read_text())["stages"]
    pool = stages["benchmark:pool:onnxruntime"]["result"]
    assert row["digest"] in pool["networks"] and row["digest"] not in pool["predicted"]
    assert "channelprune:0.95" in stages
    # the shipped ONNX file runs and computes what the rebuilt network computes
    folder = rd / "channelprune-0.95"
    assert row["files"]["onnx"] == "channelprune-0.95/model.onnx"
    assert json.loads((folder / "pruning.json").read_text())["ratio"] == row["ratio"]
    inp = x(3, seed=2)
    out = run_onnx(load_onnx(folder / "model.onnx"), inp)
    assert out.shape == (3, CLASSES)
    with torch.no_grad():
        net = lm.load_shipped(folder)
        assert torch.allclose(out, net(inp), rtol=1e-4, atol=1e-5)
    md = (rd / "report.md").read_text()
    assert "channel pruning (torch-pruning, L1 magnitude)" in md
    assert "| 0.95 | " in md.split("pruned ratio")[1]
    # rerun: every stage, the search included, is served from the record
    assert compress(cfg, rd, log=lambda m: None).ran == []
