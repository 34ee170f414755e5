"""`layermerge compress` with a ``task: diffusion`` config (the same pipeline as
classification, with the diffusion task's hooks): validation, the Fashion-MNIST
example and the paper's DDPM CIFAR-10 recipe, each through its smoke setting."""

import json

import pytest

pytest.importorskip("diffusers")

from PIL import Image

from layermerge import load_model, trace
from layermerge.cli import main
from layermerge.pipeline import (
    CompressConfig,
    ConfigError,
    compress,
    is_diffusion_config,
    load_config,
    parse_config,
)
from layermerge.plan import Plan

from .test_data import write_cifar10


def report_seed(run):
    return json.loads((run / "config.json").read_text())["seed"]


DDPM = {"task": "diffusion", "model": "diffusers:ddpm-small", "data": "fashion-mnist"}


def test_config_validation(tmp_path):
    assert is_diffusion_config("ddpm-fashion-mnist") and is_diffusion_config("ddpm-cifar10")
    assert not is_diffusion_config("demo")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) foo"):
        parse_config({**DDPM, "foo": 1})
    with pytest.raises(ConfigError, match=r"config.finetune: unknown key\(s\) lrr"):
        parse_config({**DDPM, "finetune": {"lrr": 1}})
    with pytest.raises(ConfigError, match="fractions of the table latency"):
        parse_config({**DDPM, "solve": {"budgets": [1.5]}})
    # keys of the other task are refused, saying whose they are
    with pytest.raises(ConfigError, match="label_smoothing is a key of task: classification"):
        parse_config({**DDPM, "finetune": {"label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match="quality is a key of task: diffusion"):
        parse_config({"model": "layermerge:resnet8", "data": "fashion-mnist", "quality": {}})
    with pytest.raises(ConfigError, match="task: one of classification, diffusion"):
        parse_config({**DDPM, "task": "segmentation"})
    # the task's defaults: AdamW + EMA, the table latency's fractions, FID settings
    cfg = parse_config(dict(DDPM))
    assert isinstance(cfg, CompressConfig) and cfg.task == "diffusion"
    assert cfg.solve.methods == ["layermerge"] and cfg.solve.budgets == [0.85, 0.7]
    assert cfg.recipe("finetune").optimizer == "adamw" and cfg.finetune.ema_decay == 0.99
    assert cfg.quality.classifier == "layermerge:resnet20" and cfg.schedule.beta_end == 0.02
    cfg = load_config("ddpm-cifar10")
    # the paper's recipe reaches the config: budgets, Adam 4e-4, EMA 0.9999, 100k steps
    assert cfg.solve.budgets == [0.73, 0.70, 0.58]
    assert (cfg.finetune.lr, cfg.finetune.ema_decay) == (4e-4, 0.9999)
    assert cfg.finetune.steps == 100_000 and cfg.train is None
    assert cfg.latency.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cfg.quality.features == "inception" and cfg.benchmark.forward_rounds == 6
    smoke = load_config("ddpm-cifar10", smoke=True, overrides=["seed=3"])
    assert smoke.is_smoke and smoke.seed == 3
    assert smoke.finetune.lr == 4e-4 and smoke.finetune.steps == 1
    assert smoke.train.steps == 2 and smoke.train.optimizer == "adamw"
    fm = load_config("ddpm-fashion-mnist", smoke=True)
    assert fm.latency.backends == ["onnxruntime", "torch"] and fm.quality.n == 4
    # the example: LayerMerge beside layer pruning, three fine-tuning seeds (smoke: two)
    assert fm.solve.methods == ["layermerge", "layerprune"] and fm.finetune.seeds == 2
    full = load_config("ddpm-fashion-mnist")
    assert full.solve.methods == ["layermerge", "layerprune"] and full.finetune.seeds == 3
    assert full.solve.budgets == [0.85, 0.7]
    # the base the quality metric is validated on (docs/ddpm-metric.md): 4000 steps of
    # ddpm-fmnist, a FID classifier of 4 epochs, 500 samples per network
    assert full.model == "diffusers:ddpm-fmnist" and full.train.steps == 4000
    assert (full.train.lr, full.train.ema_decay) == (0.002, 0.999)
    assert (full.quality.n, full.quality.classifier_steps) == (500, 1876)
    # the recipe fine-tunes a published UNet: without weights it says what to set
    root = write_cifar10(tmp_path / "c10", per_batch=10)
    cfg = load_config("ddpm-cifar10", overrides=[f"data=cifar10:{root}", "device=cpu"])
    with pytest.raises(ConfigError, match="set weights: PATH"):
        compress(cfg, tmp_path / "run", log=lambda *_: None)


def _structure(chain, plan):
    """Merged spans, pruned convs and dropped up-sampling convs of a plan, counted
    here from the plan file and the chain."""
    kept = {c for b in plan.blocks for c in b.kept_convs}
    removed = [c for c in chain.convs if c.index not in kept]
    return {
        "merged_spans": sum(len(b.kept_convs) >= 2 for b in plan.blocks),
        "pruned_convs": sum(not c.allow_empty for c in removed),
        "dropped_upsampling_convs": sum(c.allow_empty for c in removed),
    }


@pytest.mark.slow
def test_fashion_mnist_smoke_end_to_end_and_rerun(tmp_path, capsys):
    """The example's smoke: LayerMerge and layer pruning at one budget, every plan
    fine-tuned with two seeds, FID per seed, one sampling pool per backend."""
    run = tmp_path / "run"
    assert main(["compress", "ddpm-fashion-mnist", "--smoke", "--run-dir", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    assert report["task"] == "diffusion" and report["smoke"]
    assert "classifier features" in report["feature_space"]
    assert "not comparable to Inception FID" in report["feature_space"]
    methods = {r["method"] for r in report["rows"]}
    infeasible = [n for n in report["notes"] if " at budget " in n]
    assert len(report["rows"]) + len(infeasible) == 2 and "layermerge" in methods
    assert report["base"]["fid"] >= 0 and report["base"]["val_loss"] > 0
    # KID beside FID, each with the bootstrap SD over the network's own samples
    assert report["base"]["fid_sampling_sd"] > 0 and report["base"]["kid_x1e3_sampling_sd"] > 0
    assert "FID/KID" in report["base"]["feature_space"]
    chain = trace(load_model("diffusers:ddpm-fmnist").model, (1, 32, 32)).chain
    digests = {r["digest"] for r in report["rows"]}
    for row in report["rows"]:
        assert row["fid"] >= 0 and row["val_loss"] > 0
        # two fine-tuning seeds, each scored by its own FID: the row is their mean
        assert row["seeds"] == 2 and len(row["fid_by_seed"]) == 2
        assert row["fid"] == pytest.approx(sum(row["fid_by_seed"]) / 2)
        assert row["fid_std"] >= 0 and row["val_loss_std"] >= 0
        assert row["kid_x1e3"] == pytest.approx(sum(row["kid_x1e3_by_seed"]) / 2)
        assert row["fid_std"] == pytest.approx(
            abs(row["fid_by_seed"][0] - row["fid_by_seed"][1]) / 2**0.5
        )
        # the exported seed is the one of median FID (of two: the lower one)
        k = row["exported_seed"] - report_seed(run)
        assert row["exported_quality"]["fid"] == min(row["fid_by_seed"]) == row["fid_by_seed"][k]
        stages = json.loads((run / "stages.json").read_text())["stages"]
        for j in range(2):
            assert f"quality:{row['digest']}{f'-s{j}' if j else ''}" in stages
        # what the plan does, as the plan file says
        counts = _structure(chain, Plan.load(run / row["plan"]))
        assert {key: row[key] for key in counts} == counts
        if row["method"] == "layerprune":
            assert row["merged_spans"] == 0
        if row["method"] == "layermerge" and row["merged_spans"] == 0:
            assert row["acts_as"] == "layer pruning"
            assert "LayerMerge acts as layer pruning" in md.replace("**", "").replace("\n", " ")
        cells = [f"| {row[key]} " for key in counts]
        assert any(all(c in line for c in cells) for line in md.splitlines())
        # the exported seed's sample grid, shown as an image
        assert (run / row["samples"]).is_file() and f"]({row['samples']})" in md
        # the sampling runs: one pool per backend, base and every plan
        for b in row["benchmarks"].values():
            assert b["sampling_pool"] == len(digests) + 1
        assert row["merge_max_rel_err"] <= 1e-4
        assert set(row["benchmarks"]) == {"onnxruntime", "torch"}
        for b in row["benchmarks"].values():
            assert b["compressed_ms"] > 0 and b["sampling_s"] > 0 and b["sampling_speedup"] > 0
        # the prediction is made on the table the plan was solved with (the first backend)
        assert row["benchmarks"]["onnxruntime"]["predicted_ms"] == pytest.approx(
            row["predicted_ms"]
        )
        assert row["benchmarks"]["torch"]["predicted_ms"] is None
        # the plan fits its budget in the table's prediction
        assert row["predicted_ms"] <= row["budget_ms"] + 1e-9
        assert row["predicted_ms"] <= report["base"]["predicted_ms"]
        assert row["exports"]["onnx"]["max_rel_err"] <= 1e-4
        assert (run / row["exports"]["onnx"]["path"]).is_file()
        assert (run / f"samples_{row['digest']}.png").is_file()
    for backend in ("onnxruntime", "torch"):  # one base time per pool
        assert len({r["benchmarks"][backend]["sampling_baseline_s"] for r in report["rows"]}) == 1
    assert (run / "samples_base.png").is_file() and "](samples_base.png)" in md
    with Image.open(run / "samples_base.png") as im:
        assert im.width >= 512  # scaled up to be readable
    assert "Smoke run" in md and "± " in md
    # FID against the sampling speed-up, with the caveats of the metric beside it
    assert report["speedup_key"] == "sampling_speedup"
    assert (run / "fid_vs_speedup.png").is_file() and "](fid_vs_speedup.png)" in md
    assert "not comparable with the Inception FIDs" in md and "biased upward" in md
    assert "KID x1e3" in md and "unbiased squared MMD" in md
    assert "seed of median FID" in md
    # a rerun redoes nothing
    capsys.readouterr()
    assert main(["compress", "ddpm-fashion-mnist", "--smoke", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[run]" not in out and "[cached] importance" in out


@pytest.mark.slow
def test_ddpm_cifar10_recipe_smoke(tmp_path):
    root = write_cifar10(tmp_path / "c10", per_batch=10)
    cfg = load_config("ddpm-cifar10", smoke=True, overrides=[f"data=cifar10:{root}"])
    compress(cfg, tmp_path / "run", log=lambda *_: None)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]
    # all three budgets were solved (or reported infeasible)
    solved = {r["budget_frac"] for r in report["rows"]}
    noted = {float(n.split(":")[0].split()[-1]) for n in report["notes"]}
    assert solved | noted == {0.73, 0.70, 0.58}
    # the paper's fine-tuning recipe reached training (only steps and batch shrunk)
    ft = [v["result"] for k, v in stages.items() if k.startswith("finetune:")]
    assert ft and all(r["recipe"]["lr"] == 4e-4 for r in ft)
    assert all(
        r["recipe"]["ema_decay"] == 0.9999 and r["recipe"]["optimizer"] == "adamw" for r in ft
    )
    assert report["sampling_steps"] == 1


def test_layer_pruning_drops_resnet_convs_of_a_unet():
    """The layer-pruning baseline's plans change the UNet: a dropped ResnetBlock2D conv
    becomes the identity (fewer parameters, merge verified), and its latency entry is
    what still runs there (the GroupNorm and SiLU after a dropped first conv)."""
    from torch import nn

    from layermerge import build_space
    from layermerge.families.diffusers_unet import option_module
    from layermerge.importance import drop_conv_plan, reducible_convs
    from layermerge.latency.entries import dropped_block
    from layermerge.transform import apply, compare, merge

    model = load_model("diffusers:ddpm-small").model
    traced = trace(model, (1, 32, 32))
    space = build_space(traced.chain)
    units = {c: traced.unit_of(c) for c in reducible_convs(space)}
    first = next(c for c, u in units.items() if u.kind == "resnet" and c == u.convs[0])
    second = next(c for c, u in units.items() if u.kind == "resnet" and c == u.convs[1])
    base_params = sum(p.numel() for p in model.parameters())
    for conv, attr in ((first, "conv1"), (second, "conv2")):
        net = apply(traced, drop_conv_plan(space, conv))
        block = net.get_submodule(units[conv].path)
        assert isinstance(getattr(block, attr), nn.Identity)
        deploy = merge(net)
        assert compare(net, deploy)["max_rel_err"] <= 1e-5
        dropped = traced.module(units[conv].path).get_submodule(attr).weight.numel()
        assert sum(p.numel() for p in deploy.parameters()) < base_params - dropped + 1
    # the table's cost of a dropped conv: GroupNorm + SiLU after conv1, nothing after conv2
    kinds = [type(m).__name__ for m in option_module(traced, dropped_block(traced.chain, first))]
    assert kinds == ["GroupNorm", "SiLU"]
    assert isinstance(option_module(traced, dropped_block(traced.chain, second)), nn.Identity)
