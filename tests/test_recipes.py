"""The paper's recipes (src/layermerge/configs/*-imagenet.yaml): their values, the config
keys they need, and an end-to-end run of each with its smoke: settings on a tiny
synthetic ImageNet-style folder (train/CLASS/*.JPEG, val/CLASS/*.JPEG)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from layermerge.cli import main
from layermerge.importance import get_protocol
from layermerge.pipeline import (
    ConfigError,
    apply_overrides,
    load_config,
    packaged_configs,
    parse_config,
)

# What each recipe must hold: the paper's importance and fine-tuning protocols, and the
# reference README's rows (budget = T0 over the base latency of its own table).
RECIPES = {
    "resnet34-imagenet": {
        "env": "RESNET34_WEIGHTS",
        "model": "torchvision:resnet34",
        "width": None,
        "options": 150,
        "smoke_input": [3, 32, 32],
        "budgets": [0.71, 0.60, 0.50],
        "t0": [146.0, 123.0, 103.0],
        "finetune": {
            "epochs": 90.0,
            "lr": 0.1,
            "nesterov": False,
            "label_smoothing": 0.1,
            "weight_decay": 1e-4,
        },
    },
    "mobilenetv2-1.0-imagenet": {
        "env": "MOBILENETV2_100_WEIGHTS",
        "model": "torchvision:mobilenet_v2",
        "width": 1.0,
        "options": 391,
        "smoke_input": [3, 64, 64],
        "budgets": [0.55, 0.46, 0.38, 0.33],
        "t0": [22.3, 18.5, 15.6, 13.4],
        "finetune": {
            "epochs": 180.0,
            "lr": 0.05,
            "nesterov": True,
            "label_smoothing": 0.0,
            "weight_decay": 1e-5,
        },
    },
    "mobilenetv2-1.4-imagenet": {
        "env": "MOBILENETV2_140_WEIGHTS",
        "model": "torchvision:mobilenet_v2",
        "width": 1.4,
        "options": 391,
        "smoke_input": [3, 64, 64],
        "budgets": [0.43, 0.42, 0.35, 0.30],
        "t0": [26.1, 25.0, 21.0, 18.0],
        "finetune": {
            "epochs": 180.0,
            "lr": 0.1,
            "nesterov": True,
            "label_smoothing": 0.1,
            "weight_decay": 1e-5,
        },
    },
}
METHODS = ("layermerge", "kim23", "layerprune")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # a smoke run sets torch's thread count for its process (threads: 1)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def recipe_env(tmp_path, monkeypatch):
    """The environment variables the recipes name: an image folder and weight files."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")  # only its existence is checked before a run
    monkeypatch.setenv("IMAGENET_DIR", str(tmp_path / "imagenet"))
    for r in RECIPES.values():
        monkeypatch.setenv(r["env"], str(weights))
    return tmp_path


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_holds_the_papers_settings(name, recipe_env):
    want = RECIPES[name]
    assert name in packaged_configs()
    cfg = load_config(name)  # found by name among the packaged configs
    assert not cfg.is_smoke
    assert cfg.model == want["model"]
    assert cfg.model_kwargs.get("width_mult") == want["width"]
    assert cfg.input_shape == [3, 224, 224]
    assert cfg.data == f"imagefolder:{recipe_env / 'imagenet'}"
    assert cfg.weights == str(recipe_env / "weights.pt")
    assert cfg.device == "cuda" and cfg.workers > 0
    # importance: one epoch on 50 images per class, SGD lr 0.1 Nesterov, wd 1e-5, batch 256
    imp = cfg.importance
    assert (imp.holdout_per_class, imp.epochs, imp.steps, imp.batch_size) == (50, 1.0, None, 256)
    assert (imp.lr, imp.momentum, imp.nesterov, imp.weight_decay) == (0.1, 0.9, True, 1e-5)
    protocol, recipe = imp.resolve(cfg.seed)
    assert (protocol.name, protocol.reinit, protocol.score) == ("reference", "single", "acc")
    assert (protocol.holdout_per_class, protocol.calibration) == (50, 3)
    assert (recipe.epochs, recipe.steps, recipe.batch_size, recipe.lr) == (1.0, None, 256, 0.1)
    assert (recipe.optimizer, recipe.nesterov, recipe.seed) == ("sgd", True, cfg.seed)
    # latency: PyTorch on the GPU at batch 128 first (the budgets' backend), ONNX Runtime
    # with TensorRT second; the reference's 300 + 200 calls per entry
    lat = cfg.latency
    assert lat.backends == ["torch", "onnxruntime"] and lat.device == "cuda"
    assert (lat.batch_size, lat.protocol, lat.warmup_runs, lat.runs) == (128, "reference", 300, 200)
    assert lat.providers[0] == "TensorrtExecutionProvider"
    # the README's rows: the same fraction of each budget's T0
    assert cfg.solve.methods == list(METHODS)
    assert cfg.solve.budgets == want["budgets"]
    base = [t / b for t, b in zip(want["t0"], want["budgets"], strict=True)]
    assert max(base) / min(base) < 1.03, base
    ft = cfg.finetune
    assert ft.optimizer == "sgd" and ft.steps is None and ft.batch_size == 256
    for k, v in want["finetune"].items():
        assert getattr(ft, k) == v, k


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_smoke_shrinks_the_cost_and_keeps_the_recipe(name, recipe_env):
    full = load_config(name)
    smoke = load_config(name, smoke=True)
    assert smoke.is_smoke and smoke.weights is None
    assert smoke.input_shape == RECIPES[name]["smoke_input"] and smoke.device == "cpu"
    assert smoke.latency.device == "cpu" and smoke.latency.providers is None
    assert smoke.latency.warmup_runs + smoke.latency.runs <= 3
    assert smoke.importance.steps == 1 and smoke.finetune.steps == 2
    # the recipe's budgets, and 1.0 so that every method has a plan to fine-tune
    assert smoke.solve.budgets == [*full.solve.budgets, 1.0]
    # everything the smoke section does not name is the recipe's
    assert (smoke.model, smoke.solve.methods) == (full.model, full.solve.methods)
    assert smoke.latency.backends == full.latency.backends
    assert smoke.export == full.export
    for k in ("epochs", "lr", "momentum", "nesterov", "weight_decay", "label_smoothing"):
        assert getattr(smoke.finetune, k) == getattr(full.finetune, k), k
        if k != "label_smoothing":
            assert getattr(smoke.importance, k) == getattr(full.importance, k), k
    # --set applies after the smoke section
    again = load_config(name, smoke=True, overrides=["finetune.steps=3", "solve.budgets=[0.5]"])
    assert again.finetune.steps == 3 and again.solve.budgets == [0.5]


def test_recipe_paths_come_from_the_environment_or_set(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    monkeypatch.delenv("RESNET34_WEIGHTS", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{IMAGENET_DIR\}.*--set data=VALUE"):
        load_config("resnet34-imagenet")
    w = tmp_path / "w.pt"
    w.write_bytes(b"")
    cfg = load_config(
        "resnet34-imagenet", overrides=[f"data=imagefolder:{tmp_path}", f"weights={w}"]
    )
    assert cfg.data == f"imagefolder:{tmp_path}" and cfg.weights == str(w)
    # a smoke run needs no weights, only data
    assert (
        load_config("resnet34-imagenet", smoke=True, overrides=["data=cifar10:x"]).weights is None
    )


def test_cli_prints_the_effective_config(capsys, recipe_env):
    assert main(["compress", "mobilenetv2-1.4-imagenet", "--smoke", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("mobilenetv2-1.4-imagenet.yaml with --smoke")
    data = yaml.safe_load(out)
    assert data["input_shape"] == [3, 64, 64]
    assert data["model_kwargs"] == {"width_mult": 1.4}
    assert data["finetune"]["epochs"] == 180 and data["finetune"]["steps"] == 2
    (recipe_env / "printed.yaml").write_text(out)  # a config of its own
    assert load_config(recipe_env / "printed.yaml").input_shape == [3, 64, 64]
    assert main(["compress", "no-such-recipe"]) == 2
    assert "resnet34-imagenet" in capsys.readouterr().err  # names the packaged configs


TINY = {"model": "layermerge:resnet8", "data": "fashion-mnist"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_recipe_on_a_machine_without_cuda_says_so(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY, "device": "cuda"}))
    assert main(["compress", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--set device=cpu" in err


@pytest.mark.parametrize(
    "patch,msg",
    [
        ({"latency": {"protocol": "fast"}}, "protocol: one of adaptive, reference"),
        ({"latency": {"runs": 0}}, "runs >= 1"),
        ({"latency": {"providers": "CUDAExecutionProvider"}}, "a list of ONNX Runtime"),
        (
            {"latency": {"backends": ["torch"], "providers": ["CUDAExecutionProvider"]}},
            "onnxruntime setting",
        ),
        ({"latency": {"device": "auto"}}, "latency.device: cpu, cuda or cuda:N"),
        ({"device": "gpu"}, "device: cpu, cuda or cuda:N"),
        ({"workers": -1}, "workers"),
        ({"finetune": {"momentum": 1.5}}, "momentum: in \\[0, 1\\)"),
        ({"finetune": {"nesterov": "yes"}}, "expected bool"),
        ({"finetune": {"label_smoothing": 1.0}}, "label_smoothing"),
        ({"importance": {"steps": "one"}}, "whole number of steps"),
        ({"importance": {"weight_decay": -1.0}}, "weight_decay"),
        ({"importance": {"protocol": "long"}}, "importance.protocol: one of default, few-steps"),
        ({"importance": {"steps": 0}}, "protocol default with steps: 0 makes no optimiser step"),
        ({"importance": {"score": "f1"}}, "importance.score: one of acc, loss, kl or null"),
        ({"importance": {"reinit": "all"}}, "importance.reinit: one of single, none or null"),
        ({"importance": {"holdout_images": 0}}, "holdout_images: a whole number of images >= 1"),
        ({"importance": {"calibration": -1}}, "calibration: a whole number of entries >= 0"),
        ({"importance": {"optimizer": "lamb"}}, "importance: optimizer must be one of"),
        ({"normalize": {"mean": [0.5]}}, "normalize: a mapping with the keys mean and std"),
        ({"normalize": {"mean": [0.5, 0.5], "std": [1, 1]}}, "lists of 1 or 3 numbers"),
        ({"normalize": {"mean": [0.5], "std": [0]}}, "normalize.std: every std must be > 0"),
        ({"task": "diffusion", "normalize": {"mean": [0.5], "std": [0.5]}}, "key of task"),
        ({"train": {"optimizer": "lamb"}}, "optimizer must be one of"),
        ({"smoke": {"finetune": {"stepz": 1}}}, "smoke.finetune: unknown key"),
        ({"smoke": {"is_smoke": True}}, "cannot override is_smoke"),
        ({"is_smoke": True}, "set by `layermerge compress --smoke`"),
    ],
)
def test_new_config_keys_are_validated(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config({**TINY, **patch})


def test_smoke_and_set_errors(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY))
    with pytest.raises(ConfigError, match="needs a smoke: section"):
        load_config(tmp_path / "c.yaml", smoke=True)
    for bad, msg in (("finetune", "KEY=VALUE"), ("model.x=1", "model is not a section")):
        with pytest.raises(ConfigError, match=msg):
            apply_overrides(TINY, [bad])
    with pytest.raises(ConfigError, match="finetune: unknown key"):
        load_config(tmp_path / "c.yaml", overrides=["finetune.stepz=1"])


def test_stage_keys_of_existing_configs_are_unchanged():
    """Keys added for the recipes stay out of stage keys at their defaults, so run
    directories made before them stay cached."""
    cfg = parse_config(dict(TINY))
    assert set(cfg.section("finetune")) == {
        "epochs",
        "steps",
        "batch_size",
        "optimizer",
        "lr",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "distill",
        "distill_temperature",
    }
    assert set(cfg.section("latency")) == {
        "backends",
        "device",
        "threads",
        "batch_size",
        "max_time_s",
    }
    # the importance settings are the protocol's unless the config overrides them
    imp = cfg.section("importance")
    assert imp["protocol"] == "default" and imp["weight_decay"] is None
    assert "nesterov" not in cfg.section("importance")
    changed = parse_config({**TINY, "finetune": {"nesterov": False}})
    assert changed.section("finetune")["nesterov"] is False


# --------------------------------------------------------------------------- smoke runs


def _write_tiny_imagenet(root, classes=3, train_per_class=4, val_per_class=2, seed=0):
    """ImageNet's layout with a few small JPEGs of varied size: root/train/WNID/*.JPEG and
    root/val/WNID/*.JPEG. Each class has its own colours, each image its own pattern."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            d = root / split / f"n{1440764 + c:08d}"
            d.mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(36, 60)), int(rng.integers(36, 60))
                yy, xx = np.mgrid[0:h, 0:w] / 16.0
                freq = rng.uniform(0.5, 3.0, size=(3, 2))
                phase = rng.uniform(0, 2 * math.pi, size=3)
                img = np.stack(
                    [
                        np.sin(freq[k, 0] * xx + freq[k, 1] * yy + phase[k] + 2 * c)
                        for k in range(3)
                    ],
                    axis=-1,
                )
                img = (img * 90 + 128 + rng.normal(0, 15, img.shape)).clip(0, 255)
                Image.fromarray(img.astype(np.uint8)).save(
                    d / f"n{1440764 + c:08d}_{i}.JPEG", quality=90
                )
    return root


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    return _write_tiny_imagenet(tmp_path_factory.mktemp("tiny-imagenet"))


def _check_smoke_run(name, run_dir):
    want = RECIPES[name]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["smoke"] is True
    assert "**Smoke run**" in (run_dir / "report.md").read_text()
    assert report["model"] == want["model"] and report["input_shape"] == want["smoke_input"]
    assert report["chain_length"] == (32 if "resnet" in name else 50)
    assert all(report["base"]["latency_ms"][b] > 0 for b in ("torch", "onnxruntime"))

    # every method at every budget: a row, or a note saying that the budget is below the
    # method's fastest plan; at 1.0 (added by the smoke section) every method has a plan
    got = {(r["method"], r["budget_frac"]) for r in report["rows"]}
    for method in METHODS:
        assert (method, 1.0) in got
        for frac in want["budgets"]:
            note = f"{method} at budget {frac:g}: no {method} plan fits"
            assert (method, frac) in got or any(n.startswith(note) for n in report["notes"])
    assert any(m == "layermerge" and f < 1 for m, f in got)  # it compresses something

    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    expected = {"base", "latency:torch", "latency:onnxruntime", "importance"}
    expected |= {f"solve:{m}" for m in METHODS}
    expected |= {"benchmark:pool:torch", "benchmark:pool:onnxruntime"}
    for row in report["rows"]:
        d = row["digest"]
        expected |= {f"finetune:{d}", f"export:{d}"}
        # solved within its budget, merged exactly, exported exactly, timed
        assert row["predicted_ms"] <= row["budget_ms"] + 1e-9
        assert row["merge_max_rel_err"] <= 1e-4
        onnx = row["exports"]["onnx"]
        assert (run_dir / onnx["path"]).is_file() and onnx["max_rel_err"] <= 1e-4
        assert all(row["measured_ms_by_backend"][b] > 0 for b in ("torch", "onnxruntime"))
        assert row["speedup"] > 0 and 0 <= row["accuracy"] <= 100
    assert expected <= set(stages), expected - set(stages)

    # the tables cover the whole search space, measured as the smoke section says
    imp_name = next(p.name for p in run_dir.glob("importance-*.csv"))
    imp_meta = json.loads((run_dir / f"{imp_name}.meta.json").read_text())
    assert imp_meta["entries"] == want["options"]
    assert imp_meta["holdout_per_class"] == 1 and imp_meta["holdout_train_size"] == 3
    r = imp_meta["recipe"]
    assert (r["steps"], r["lr"], r["nesterov"], r["weight_decay"]) == (1, 0.1, True, 1e-5)
    lat_meta = json.loads((run_dir / "latency_torch.csv.meta.json").read_text())
    assert lat_meta["batch_size"] == 1 and lat_meta["device"] == "cpu"
    assert lat_meta["timing"]["protocol"] == "fixed" and lat_meta["timing"]["runs"] == 2

    # the recipe's fine-tuning settings reach the optimiser: the settings training ran
    # with, and the optimiser state in its checkpoint
    ft = want["finetune"]
    for row in report["rows"]:
        res = stages[f"finetune:{row['digest']}"]["result"]
        assert res["steps"] == 2  # the smoke's two steps, not 90 or 180 epochs
        rec = res["recipe"]
        assert (rec["epochs"], rec["steps"], rec["batch_size"]) == (ft["epochs"], 2, 8)
        assert (rec["lr"], rec["nesterov"], rec["weight_decay"]) == (
            ft["lr"],
            ft["nesterov"],
            ft["weight_decay"],
        )
        assert res["task"]["label_smoothing"] == ft["label_smoothing"]
    ckpt = next((run_dir / "finetuned").glob(f"{report['rows'][0]['digest']}-*.ckpt"))
    group = torch.load(ckpt, weights_only=True)["optimizer"]["param_groups"][0]
    assert group["nesterov"] is ft["nesterov"] and group["weight_decay"] == ft["weight_decay"]
    assert group["momentum"] == 0.9
    return report


def _exported_matches_pytorch(run_dir, row):
    """The ONNX file of a row, run by ONNX Runtime, against the merged network rebuilt
    from the run directory (model + plan + fine-tuned weights)."""
    import layermerge as lm
    from layermerge.export import load_compressed, load_onnx, run_onnx

    cfg = json.loads((run_dir / "config.json").read_text())
    base = json.loads((run_dir / "stages.json").read_text())["stages"]["base"]["result"]
    loaded = lm.load_model(
        cfg["model"], cfg["model_kwargs"], run_dir / base["weights"], tuple(cfg["input_shape"])
    )
    traced = lm.trace(loaded.model, loaded.input_shape)
    deploy = load_compressed(
        traced, run_dir / row["plan"], run_dir / "finetuned" / f"{row['digest']}.pt"
    )
    x = torch.randn(2, *loaded.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = deploy(x)
    got = torch.as_tensor(run_onnx(load_onnx(run_dir / row["exports"]["onnx"]["path"]), x))
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


# One recipe runs end to end: the three recipes share every stage of the pipeline and
# differ in model, width, budgets and recipe values, which the config tests above check
# for each (ResNet-34's tracing and merging are checked in test_transform). Each run
# takes 3-4.5 min of the suite's 30-min budget on the 2-core CI machine.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenetv2-1.0-imagenet"])
def test_recipe_smoke_run_end_to_end(name, tiny_imagenet, tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENET_DIR", raising=False)
    run_dir = tmp_path / "run"
    argv = ["compress", name, "--smoke", "--set", f"data=imagefolder:{tiny_imagenet}"]
    assert main([*argv, "--run-dir", str(run_dir)]) == 0
    report = _check_smoke_run(name, run_dir)
    _exported_matches_pytorch(run_dir, report["rows"][-1])


# --------------------------------------------------------------------------- torchrun


def test_compress_under_torchrun_shares_the_work_and_records_one_run(tmp_path):
    """Two CPU ranks (gloo): training, evaluation and importance on both, everything
    else on rank 0; the run directory is the one a single process would resume."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from layermerge.pipeline import compress

    from .test_data import write_mnist_like

    data = write_mnist_like(tmp_path / "mnist", n_train=64, n_test=16)
    cfg = {
        "model": "layermerge:resnet8",
        "model_kwargs": {"in_chans": 1, "width": 4},
        "input_shape": [1, 8, 8],
        "data": f"mnist:{data}",
        "threads": 1,
        "train": {"steps": 2, "batch_size": 16, "lr": 0.05},
        "latency": {"backends": ["torch"], "protocol": "reference", "warmup_runs": 1, "runs": 2},
        "importance": {"holdout_per_class": 2, "steps": 1, "batch_size": 8},
        "solve": {"budgets": [1.0, 0.8], "precision": 10000},
        "finetune": {"steps": 2, "batch_size": 8, "nesterov": False, "label_smoothing": 0.1},
        "export": {"formats": ["torchscript"]},
        "benchmark": {"rounds": 2, "calls_per_round": 1, "max_time_s": 3},
    }
    (tmp_path / "dist.yaml").write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
        "-m", "layermerge.cli", "compress", str(tmp_path / "dist.yaml"), "--run-dir", str(run_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert "2 ranks: training, evaluation and importance on all of them" in out
    assert sum(line.startswith("report written to") for line in out) == 1  # rank 0 only
    runs = [line for line in out if line.startswith("[run] ")]
    assert "[run] importance" in runs and len(runs) == len(set(runs))  # logged once

    report = json.loads((run_dir / "report.json").read_text())
    got = {(r["method"], r["budget_frac"]) for r in report["rows"]}
    assert got  # (which methods meet which budget depends on two timed calls per entry)
    for method in METHODS:
        for frac in (1.0, 0.8):
            note = f"{method} at budget {frac:g}: no {method} plan fits"
            assert (method, frac) in got or any(n.startswith(note) for n in report["notes"])
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    for row in report["rows"]:
        ft = stages[f"finetune:{row['digest']}"]["result"]
        assert ft["steps"] == 2 and ft["recipe"]["nesterov"] is False
        assert ft["task"]["label_smoothing"] == 0.1
        assert row["merge_max_rel_err"] <= 1e-4 and row["measured_ms"] > 0
    imp = next(run_dir.glob("importance-*.csv"))
    assert json.loads((run_dir / f"{imp.name}.meta.json").read_text())["complete"]
    assert not list(run_dir.glob("*shard*"))  # the ranks' shards merged by rank 0

    # one process finds every stage done
    again = compress(load_config(tmp_path / "dist.yaml"), run_dir, log=lambda m: None)
    assert again.ran == [] and "importance" in again.cached


def test_importance_protocol_of_the_demo_and_the_diffusion_configs():
    """The demo scores options with the default protocol; a config's keys override the
    protocol's, and the diffusion task keeps its own short AdamW fine-tune."""
    demo = load_config("demo")
    protocol, recipe = demo.importance.resolve(demo.seed)
    assert protocol.name == "default" and protocol == get_protocol("default")
    assert (recipe.steps, recipe.batch_size, recipe.lr, recipe.warmup_steps) == (20, 128, 0.01, 3)
    custom = parse_config(
        {**TINY, "importance": {"protocol": "few-steps", "steps": 4, "score": "acc"}}
    )
    protocol, recipe = custom.importance.resolve(0)
    assert (protocol.steps, protocol.score, protocol.bn_batches) == (4, "acc", 1)
    assert recipe.steps == 4 and recipe.batch_size == 64
    bn = parse_config({**TINY, "importance": {"protocol": "bn-recalib"}})
    protocol, recipe = bn.importance.resolve(0)
    assert recipe is None and protocol.bn_batches == 2
    ddpm = load_config("ddpm-fashion-mnist")
    protocol, recipe = ddpm.importance.resolve(ddpm.seed)
    assert (protocol.holdout_per_class, protocol.holdout_images, protocol.reinit) == (
        10,
        None,
        "none",
    )
    assert (recipe.steps, recipe.lr, recipe.optimizer, recipe.warmup_steps) == (5, 1e-4, "adamw", 0)


def test_normalization_comes_from_the_config_then_the_model():
    from layermerge.pipeline.compress import normalization

    timm_pre = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    cfg = parse_config(dict(TINY))
    assert normalization(cfg, None) is None  # the dataset's statistics
    assert normalization(cfg, timm_pre) == {**timm_pre, "from": "the model's pretrained_cfg"}
    mine = parse_config({**TINY, "normalize": {"mean": [0.5], "std": [0.25]}})
    assert normalization(mine, timm_pre) == {"mean": [0.5], "std": [0.25], "from": "config"}
