"""The CUDA paths, on a machine where torch sees a GPU (the CI machine has none, so this
module is skipped there; run it with ``pytest tests/test_cuda.py`` on a GPU machine):
timing on the GPU, a latency table measured there, mixed-precision training, and a
whole compress run with training, importance and latency on the GPU."""

import json

import pytest
import torch
import yaml

from layermerge import build_space, conv_weights, trace
from layermerge.latency import build_latency_table, make_backend, predict_latency
from layermerge.pipeline import compress, load_config
from layermerge.tasks import ClassificationTask
from layermerge.train import Recipe, evaluate, fit

from .helpers import tiny_resnet, write_mnist_like

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FAST = dict(max_time_s=0.05)


def test_torch_backend_times_on_the_gpu():
    backend = make_backend(backend="torch", device="cuda", batch_size=4)
    meta = backend.meta()
    assert (
        meta["device"].startswith("cuda:") and meta["device_name"] == torch.cuda.get_device_name()
    )
    assert meta["versions"]["cuda"] == torch.version.cuda
    m = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU()).eval()
    run = backend.prepare(m, (8, 16, 16))
    run()  # a call returns once the GPU has finished it (synchronised)
    assert torch.cuda.current_stream().query()


def test_latency_table_on_the_gpu(tmp_path):
    from layermerge.latency import TimingConfig

    traced = trace(tiny_resnet().eval(), (1, 16, 16))
    space = build_space(traced.chain, conv_weights(traced))
    backend = make_backend(backend="torch", device="cuda", batch_size=16)
    table = build_latency_table(
        traced, tmp_path / "lat.csv", backend, timing=TimingConfig(**FAST), progress=False
    )
    assert sorted(table.keys()) == sorted(o.key for o in space.options)
    assert table.meta["complete"] is True and table.meta["device"].startswith("cuda")
    assert all(r["latency_ms"] >= 0 for r in table.rows)
    exact = table.meta["identity_ms"] - table.meta.get("constant_raw_ms", 0.0)
    assert predict_latency(table, space.identity_plan()) == pytest.approx(exact)


def test_mixed_precision_training_on_the_gpu(tmp_path):
    root = write_mnist_like(tmp_path / "d", n_train=512, n_test=128, size=16, classes=4)
    task = ClassificationTask()
    splits = task.make_data(f"fashion-mnist:{root}", (1, 16, 16), holdout_per_class=8, seed=0)
    model = tiny_resnet().cuda()
    before = evaluate(model, task, splits.test, device="cuda")
    recipe = Recipe(steps=60, batch_size=32, lr=0.05, amp=True, seed=0)
    fit(model, task, splits.train, recipe, device="cuda", progress=False)
    after = evaluate(model, task, splits.test, device="cuda")
    # weights stay float32 under autocast, and the loss of the learnable synthetic classes falls
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    assert after["loss"] < 0.5 * before["loss"]


def test_compress_on_the_gpu(tmp_path):
    root = write_mnist_like(tmp_path / "d", n_train=400, n_test=100, size=16, classes=10)
    cfg = {
        "model": "layermerge:resnet8",
        "model_kwargs": {"in_chans": 1, "width": 8},
        "input_shape": [1, 16, 16],
        "data": f"fashion-mnist:{root}",
        "device": "cuda",
        "train": {"steps": 20, "batch_size": 32, "lr": 0.05},
        "latency": {"backends": ["torch"], "device": "cuda", "batch_size": 16, **FAST},
        "importance": {"holdout_per_class": 4, "steps": 2, "batch_size": 16},
        "solve": {"budgets": [0.95, 0.8], "precision": 10000},
        "finetune": {"steps": 3, "batch_size": 32, "lr": 0.01, "distill": 0.5},
        "export": {"formats": ["onnx"]},
        "benchmark": {"rounds": 2, "calls_per_round": 2, "max_time_s": 3},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    compress(load_config(tmp_path / "c.yaml"), tmp_path / "run", log=lambda m: None)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["base"]["latency_ms"]["torch"] > 0 and report["rows"]
    for row in report["rows"]:
        assert row["merge_max_rel_err"] <= 1e-4
        assert row["exports"]["onnx"]["max_rel_err"] <= 1e-4
        assert row["measured_ms_by_backend"]["torch"] > 0
    lat = json.loads((tmp_path / "run" / "latency_torch.csv.meta.json").read_text())
    assert lat["device"].startswith("cuda") and lat["batch_size"] == 16
    imp = next((tmp_path / "run").glob("importance-*.csv.meta.json"))
    assert json.loads(imp.read_text())["device"] == "cuda"
    assert report["importance"]["calibration_seeds"] == 3
    assert report["importance"]["noise_floor"] >= 0
