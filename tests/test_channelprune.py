"""Structured channel pruning with torch-pruning (layermerge.channelprune) and the
compress method ``channelprune`` that compares it with LayerMerge."""

import json
import shutil
import sys
import warnings

import pytest
import torch
from torch import nn

from layermerge import load_model
from layermerge.channelprune import (
    MISSING,
    PRUNED_SCHEMA,
    available,
    count_macs,
    count_params,
    find_ratio,
    layer_widths,
    load_pruned,
    prune_channels,
    prune_to_widths,
    rebuild_pruned,
    tensor_shapes,
)
from layermerge.pipeline import ConfigError, compress, load_shipped, parse_config
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
def test_round_to_keeps_widths_multiples_and_high_ratios_still_prune():
    torch.manual_seed(0)
    m = load_model("layermerge:resnet8", {"in_chans": 1, "width": 16, "num_classes": CLASSES})
    base = m.model.eval()
    widths = {}
    for ratio in (0.3, 0.6, 0.95):
        net = prune_channels(base, ratio, x(), round_to=8)
        widths[ratio] = convs(net)
        assert all(w % 8 == 0 for w in widths[ratio]), widths[ratio]
        assert sum(widths[ratio]) < sum(convs(base))
        assert net(x(2)).shape == (2, CLASSES)
    # more pruning at each larger ratio, down to 8 channels per layer at the cap (a
    # ratio that left too few to round to 8 would otherwise prune nothing)
    assert sum(widths[0.3]) > sum(widths[0.6]) > sum(widths[0.95])
    assert set(widths[0.95]) == {8}


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


@needs_tp
def test_a_pruned_network_rebuilds_from_its_weights_alone(model, tmp_path):
    a = prune_channels(model, 0.6, x())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_state_dict(a, tmp_path / "pruned.safetensors")
    # the widths, read off the file's header, are the pruned network's
    shapes = tensor_shapes(tmp_path / "pruned.safetensors")
    assert layer_widths(model, shapes) == layer_widths(a) != layer_widths(model)
    # any weights of the architecture: a fresh, differently seeded one
    arch = load_model("layermerge:resnet20", {"in_chans": 1, "width": 8, "num_classes": CLASSES})
    b = rebuild_pruned(arch.model, tmp_path / "pruned.safetensors", x())
    assert same_state(a, b) and torch.equal(a(x(3, seed=1)), b(x(3, seed=1)))
    assert convs(arch.model) == convs(model)  # the architecture given is left as it was
    # widths a residual add cannot give together: both branches must shrink alike
    widths = layer_widths(a)
    widths["layer1.0.conv2"] = widths["layer1.0.conv2"] - 1 or 2
    with pytest.raises(
        ValueError, match=r"mine\.json: the model cannot be pruned to these widths together"
    ):
        prune_to_widths(model, widths, x(), source="mine.json")
    with pytest.raises(ValueError, match=r"mine\.json: layer fc has 9 output channels"):
        prune_to_widths(model, {"fc": 9}, x(), source="mine.json")
    # weights of another, narrower model: the file is named
    narrow = load_model("layermerge:resnet20", {"in_chans": 1, "width": 4, "num_classes": CLASSES})
    with pytest.raises(ValueError, match=r"pruned\.safetensors: layer .* cannot be pruned to"):
        rebuild_pruned(narrow.model, tmp_path / "pruned.safetensors", x())


#: (registry model, its kwargs, input shape) of the shipped-folder tests: residual
#: adds, and depthwise convs in inverted residuals
SHIPPED_MODELS = {
    "resnet8": ("layermerge:resnet8", {"in_chans": 1, "width": 8, "num_classes": CLASSES}),
    "mobilenetv2": ("layermerge:mobilenetv2_mini", {"in_chans": 1, "num_classes": CLASSES}),
}


def ship_pruned(tmp_path_factory, name: str):
    """A channel-pruned network shipped as compress ships one (model.onnx of the
    BatchNorm-folded network, weights.safetensors, pruning.json, model.json), in a
    run directory whose base weights are then deleted."""
    from layermerge.pipeline.networks import fold
    from layermerge.pipeline.ship import pruning_info

    spec, kw = SHIPPED_MODELS[name]
    base = randomize_batchnorm(load_model(spec, kw).model.eval(), seed=1)
    net = prune_channels(base, 0.5, x())
    with torch.no_grad():  # "fine-tuned"
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    rd = tmp_path_factory.mktemp(f"run-{name}")
    save_state_dict(base, rd / "base.pt")
    folder = rd / "channelprune-0.50"
    folder.mkdir()
    save_state_dict(net, folder / "weights.safetensors")
    # the ONNX file of the BatchNorm-folded network (compress exports it with the dynamo
    # exporter, 50x slower on these tiny networks; the computation is the same)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fold(net, SHAPE, export=True),
            (x(),),
            str(folder / "model.onnx"),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    widths = layer_widths(base, tensor_shapes(folder / "weights.safetensors"))
    row = {"method": "channelprune", "ratio": 0.5, "search": {"pruning": {"p": 1}}}
    (folder / "pruning.json").write_text(json.dumps(pruning_info(row, widths)))
    meta = {"model": spec, "model_kwargs": kw, "input_shape": list(SHAPE)}
    (folder / "model.json").write_text(json.dumps(meta))
    moved = tmp_path_factory.mktemp(f"elsewhere-{name}") / "pruned"
    shutil.copytree(folder, moved)
    shutil.rmtree(rd)  # the base weights are gone with the run directory
    return net, moved


@pytest.fixture(scope="module", params=sorted(SHIPPED_MODELS))
def shipped(request, tmp_path_factory):
    if not available():
        pytest.skip("needs torch-pruning ([prune] extra)")
    return ship_pruned(tmp_path_factory, request.param)


@needs_tp
def test_a_shipped_pruned_folder_loads_from_itself_alone(shipped, tmp_path, monkeypatch):
    net, folder = shipped
    info = json.loads((folder / "pruning.json").read_text())
    assert info["schema"] == PRUNED_SCHEMA and info["widths"] == layer_widths(net)
    assert "base_weights" not in info
    monkeypatch.chdir(tmp_path)  # another directory
    got = load_shipped(folder)
    assert convs(got) == convs(net) and count_params(got) == count_params(net)
    inp = x(4, seed=5)
    with torch.no_grad():
        assert torch.allclose(got(inp), net(inp), rtol=0, atol=1e-5)
    # a folder shipped before the widths were recorded (schema 1: the ratio and the
    # base weights, here gone): the widths are read off weights.safetensors
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / "pruning.json").write_text(
        json.dumps({"method": "channelprune", "ratio": 0.5, "base_weights": "../base.pt"})
    )
    got = load_shipped(old)
    with torch.no_grad():
        assert torch.allclose(got(inp), net(inp), rtol=0, atol=1e-5)


@needs_tp
def test_a_shipped_pruned_folder_that_does_not_fit_says_which_file(shipped, tmp_path):
    from safetensors.torch import load_file, save_file

    net, folder = shipped
    bad = tmp_path / "bad"

    def copy(**edits):
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(folder, bad)
        for name, change in edits.items():
            f = bad / name
            change(f)
        return bad

    def edit_json(fn):
        def change(f):
            d = json.loads(f.read_text())
            fn(d)
            f.write_text(json.dumps(d))

        return change

    # weights that are not model.onnx's network: verify catches it
    def nudge(f):
        sd = load_file(str(f))
        k = next(k for k in sd if k.endswith("weight") and sd[k].dim() > 1)
        sd[k] = sd[k] + 0.5
        save_file(sd, str(f))

    copy(**{"weights.safetensors": nudge})
    with pytest.raises(ValueError, match=r"does not compute what .*bad/model\.onnx does"):
        load_shipped(bad)
    load_shipped(bad, verify=False)  # unchecked, it loads
    # widths in pruning.json that the weights do not have
    first = next(iter(layer_widths(net)))

    def narrower(d):
        d["widths"][first] -= 1

    copy(**{"pruning.json": edit_json(narrower)})
    with pytest.raises(ValueError, match=r"bad/pruning\.json: the model cannot be pruned to"):
        load_shipped(bad)
    # another architecture in model.json: a narrower one cannot hold the weights

    def thinner(d):
        kw = d["model_kwargs"]
        kw.update({"width_mult": 0.25} if "mobilenet" in d["model"] else {"width": 2})

    copy(**{"model.json": edit_json(thinner)})
    with pytest.raises(ValueError, match=r"bad/pruning\.json.*cannot be pruned to"):
        load_shipped(bad)

    def newer(d):
        d["schema"] = PRUNED_SCHEMA + 1

    copy(**{"pruning.json": edit_json(newer)})
    with pytest.raises(ValueError, match=r"pruning\.json: schema .* newer layermerge"):
        load_shipped(bad)


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


def test_round_to_in_the_config_is_checked():
    cfg = {"model": "layermerge:resnet8", "data": "fashion-mnist"}
    assert parse_config(cfg).solve.channelprune_round_to == [8, None]
    for given, want in ((None, [None]), (16, [16]), ([16, 8], [16, 8])):
        solve = {"channelprune_round_to": given}
        assert parse_config({**cfg, "solve": solve}).solve.channelprune_round_to == want
    for bad in (0, -8, 2.5, True, "8", [], [8, 0]):
        with pytest.raises(ConfigError, match=r"solve\.channelprune_round_to: "):
            parse_config({**cfg, "solve": {"channelprune_round_to": bad}})


# --------------------------------------------------------------------------- compress


def tiny_config(data) -> dict:
    return {
        "model": "layermerge:resnet8",
        "model_kwargs": {"in_chans": 1, "width": 16, "num_classes": CLASSES},
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
    info = json.loads((folder / "pruning.json").read_text())
    assert info["ratio"] == row["ratio"] and info["schema"] == PRUNED_SCHEMA
    # both default roundings were searched; the one kept is within the budget with the
    # most parameters, and every pruned width is a multiple of it (the classifier's
    # outputs are not pruned)
    searched = row["search"]["searched"]
    assert [s["round_to"] for s in searched] == [8, None]
    kept = row["search"]["pruning"]["round_to"]
    (chosen,) = [s for s in searched if s["round_to"] == kept]
    assert chosen["params"] == row["params"] and chosen["ratio"] == row["ratio"]
    assert chosen["params"] == max(s["params"] for s in searched if s["within_budget"])
    if kept is not None:
        assert all(w % kept == 0 or w == CLASSES for w in info["widths"].values())
    inp = x(3, seed=2)
    out = run_onnx(load_onnx(folder / "model.onnx"), inp)
    assert out.shape == (3, CLASSES)
    # the folder loads without the run's base weights (checked against model.onnx)
    (rd / "base.pt").rename(rd / "base.pt.away")
    with torch.no_grad():
        net = lm.load_shipped(folder)
        assert torch.allclose(out, net(inp), rtol=1e-4, atol=1e-5)
    (rd / "base.pt.away").rename(rd / "base.pt")
    assert info["widths"] == layer_widths(net) and count_params(net) < report["base"]["params"]
    assert 'lm.load_shipped("channelprune-0.95")' in (folder / "README.md").read_text()
    md = (rd / "report.md").read_text()
    assert "channel pruning (torch-pruning, L1 magnitude)" in md
    assert "| 0.95 | " in md.split("pruned ratio")[1]
    # rerun: every stage, the search included, is served from the record
    assert compress(cfg, rd, log=lambda m: None).ran == []
