"""`layermerge compress` with a diffusion config: validation, the Fashion-MNIST example
and the paper's DDPM CIFAR-10 recipe, each through its smoke setting."""

import json

import pytest

pytest.importorskip("diffusers")

from layermerge.cli import main
from layermerge.compress_diffusion import (
    DiffusionConfigError,
    compress_diffusion,
    is_diffusion_config,
    load_diffusion_config,
    parse_diffusion_config,
)

from .test_data import write_cifar10


def test_config_validation(tmp_path):
    assert is_diffusion_config("ddpm-fashion-mnist") and is_diffusion_config("ddpm-cifar10")
    assert not is_diffusion_config("demo")
    with pytest.raises(DiffusionConfigError, match="unknown key 'foo'"):
        parse_diffusion_config({"task": "diffusion", "foo": 1})
    with pytest.raises(DiffusionConfigError, match=r"unknown key\(s\) \['lrr'\] in finetune"):
        parse_diffusion_config({"task": "diffusion", "finetune": {"lrr": 1}})
    with pytest.raises(DiffusionConfigError, match="fractions in"):
        parse_diffusion_config({"task": "diffusion", "solve": {"budgets": [1.5]}})
    cfg = load_diffusion_config("ddpm-cifar10")
    # the paper's recipe reaches the config: budgets, Adam 4e-4, EMA 0.9999, 100k steps
    assert cfg["solve"]["budgets"] == [0.73, 0.70, 0.58]
    assert (cfg["finetune"]["lr"], cfg["finetune"]["ema_decay"]) == (4e-4, 0.9999)
    assert cfg["finetune"]["steps"] == 100_000 and cfg["train"] is None
    smoke = load_diffusion_config("ddpm-cifar10", smoke=True, overrides=["seed=3"])
    assert smoke["is_smoke"] and smoke["seed"] == 3
    assert smoke["finetune"]["lr"] == 4e-4 and smoke["finetune"]["steps"] == 1
    # the recipe fine-tunes a published UNet: without weights it says what to set
    root = write_cifar10(tmp_path / "c10", per_batch=10)
    cfg = load_diffusion_config("ddpm-cifar10", overrides=[f"data=cifar10:{root}", "device=cpu"])
    with pytest.raises(DiffusionConfigError, match="set weights: PATH"):
        compress_diffusion(cfg, tmp_path / "run", log=lambda *_: None)


@pytest.mark.slow
def test_fashion_mnist_smoke_end_to_end_and_rerun(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["compress", "ddpm-fashion-mnist", "--smoke", "--run-dir", str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "diffusion" and report["smoke"]
    assert "classifier features" in report["feature_space"]
    assert "not comparable to Inception FID" in report["feature_space"]
    fracs = [r["budget_frac"] for r in report["rows"]]
    infeasible = [n for n in report["notes"] if "infeasible" in n or "smallest" in n]
    assert len(fracs) + len(infeasible) == 2 and fracs
    for row in report["rows"]:
        assert row["fid"] >= 0 and row["val_loss"] > 0
        assert set(row["backends"]) == {"onnxruntime", "torch"}
        for b in row["backends"].values():
            assert b["forward_ms"] > 0 and b["sampling_s"] > 0 and b["sampling_speedup"] > 0
        # the prediction is made on the table the plan was solved with (the first backend)
        assert row["backends"]["onnxruntime"]["predicted_ms"] == pytest.approx(row["predicted_ms"])
        assert row["backends"]["torch"]["predicted_ms"] is None
        # the plan fits its budget in the table's prediction
        assert row["predicted_ms"] <= report["base"]["predicted_ms"]
        for e in report["exports"][f"{row['budget_frac']:.2f}"]:
            assert e["max_rel_err"] <= 1e-4
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
    cfg = load_diffusion_config("ddpm-cifar10", smoke=True, overrides=[f"data=cifar10:{root}"])
    report = compress_diffusion(cfg, tmp_path / "run", log=lambda *_: None)
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]
    # all three budgets were solved (or reported infeasible with the smallest budget)
    solved = {r["budget_frac"] for r in report["rows"]}
    assert solved | {float(n.split(":")[0].split()[1]) for n in report["notes"]} == {
        0.73,
        0.70,
        0.58,
    }
    # the paper's fine-tuning recipe reached training (only steps and batch shrunk)
    ft = [v["result"] for k, v in stages.items() if k.startswith("finetune:")]
    assert ft and all(r["recipe"]["lr"] == 4e-4 for r in ft)
    assert all(
        r["recipe"]["ema_decay"] == 0.9999 and r["recipe"]["optimizer"] == "adamw" for r in ft
    )
    assert report["sampling_steps"] == 1
