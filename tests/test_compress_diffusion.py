"""`layermerge compress` with a ``task: diffusion`` config (the same pipeline as
classification, with the diffusion task's hooks): validation, the Fashion-MNIST
example and the paper's DDPM CIFAR-10 recipe, each through its smoke setting."""

import json

import pytest

pytest.importorskip("diffusers")

from layermerge.cli import main
from layermerge.pipeline import (
    CompressConfig,
    ConfigError,
    compress,
    is_diffusion_config,
    load_config,
    parse_config,
)

from .test_data import write_cifar10

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
    # the recipe fine-tunes a published UNet: without weights it says what to set
    root = write_cifar10(tmp_path / "c10", per_batch=10)
    cfg = load_config("ddpm-cifar10", overrides=[f"data=cifar10:{root}", "device=cpu"])
    with pytest.raises(ConfigError, match="set weights: PATH"):
        compress(cfg, tmp_path / "run", log=lambda *_: None)


@pytest.mark.slow
def test_fashion_mnist_smoke_end_to_end_and_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["compress", "ddpm-fashion-mnist", "--smoke", "--run-dir", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "diffusion" and report["smoke"]
    assert "classifier features" in report["feature_space"]
    assert "not comparable to Inception FID" in report["feature_space"]
    fracs = [r["budget_frac"] for r in report["rows"]]
    infeasible = [n for n in report["notes"] if n.startswith("layermerge at budget")]
    assert len(fracs) + len(infeasible) == 2 and fracs
    assert report["base"]["fid"] >= 0 and report["base"]["val_loss"] > 0
    for row in report["rows"]:
        assert row["fid"] >= 0 and row["val_loss"] > 0
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
    assert (run / "samples_base.png").is_file()
    assert "Smoke run" in (run / "report.md").read_text()
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
