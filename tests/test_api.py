"""layermerge.compress over Python objects: a plain nn.Module and TensorDatasets,
no registry string, no built-in data format; the shipped files of each plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import layermerge as lm
from layermerge.export import load_onnx, run_onnx


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        layers = []
        for _ in range(4):
            layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    for i, c in enumerate(y):
        x[i, 0, int(c) * 5 : int(c) * 5 + 5, :] += 1.0
    return TensorDataset(x, y)


FAST = {
    "latency": {"backends": ["onnxruntime", "torch"], "max_time_s": 0.01},
    "importance": {"steps": 1, "batch_size": 8},
    "finetune": {"steps": 2, "batch_size": 8},
    "benchmark": {"rounds": 1, "calls_per_round": 2, "max_time_s": 2.0},
    "threads": 1,
    # a network of microseconds: latencies counted in 1/10000 ms, not the default 1/100
    "solve": {"precision": 10000.0},
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    rd = tmp_path_factory.mktemp("api") / "run"
    res = lm.compress(
        model,
        train=_data(48, 0),
        val=DataLoader(_data(24, 1), batch_size=5),
        budgets=[0.8],
        run_dir=rd,
        log=lambda m: None,
        **FAST,
    )
    return model, res


def test_shipped_onnx_matches_the_deploy_network(result):
    model, res = result
    folder = res.run_dir / "layermerge-0.80"
    for name in ("model.onnx", "model.pt2", "weights.safetensors", "plan.json", "README.md"):
        assert (folder / name).is_file(), name
    net = lm.load_shipped(folder, model=model)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = net(x)
    got = run_onnx(load_onnx(folder / "model.onnx"), x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    program = torch.export.load(str(folder / "model.pt2")).module()
    assert torch.allclose(program(x), ref, atol=1e-5)
    # the shipped ONNX is the file the onnxruntime benchmark timed
    report = json.loads((res.run_dir / "report.json").read_text())
    (row,) = report["rows"]
    meta = json.loads((folder / "model.json").read_text())
    bench = row["benchmarks"]["onnxruntime"]
    assert bench["onnx_sha256"] == meta["sha256"]["model.onnx"]
    assert row["measured_ms_by_backend"]["onnxruntime"] > 0


def test_report_and_card_link_every_file(result):
    _, res = result
    md = res.report.read_text()
    card = (res.run_dir / "layermerge-0.80" / "README.md").read_text()
    for name in ("model.onnx", "model.pt2", "weights.safetensors", "plan.json"):
        assert f"layermerge-0.80/{name}" in md
        assert f"({name})" in card
    assert "speed-up onnxruntime" in card and "accuracy" in card.lower()


def test_rerun_is_cached_and_other_weights_are_not(result, tmp_path):
    model, res = result
    again = lm.compress(
        model,
        train=_data(48, 0),
        val=_data(24, 1),
        budgets=[0.8],
        run_dir=res.run_dir,
        log=lambda m: None,
        **FAST,
    )
    assert again.ran == []
    with torch.no_grad():
        model.head.bias.add_(1.0)
    try:
        other = lm.compress(
            model,
            train=_data(48, 0),
            val=_data(24, 1),
            budgets=[0.8],
            run_dir=res.run_dir,
            log=lambda m: None,
            **{**FAST, "latency": {**FAST["latency"], "backends": ["torch"]}},
        )
    finally:
        with torch.no_grad():
            model.head.bias.sub_(1.0)
    assert "base" in other.ran


def test_bad_objects_are_refused(tmp_path):
    from layermerge.pipeline import ConfigError

    with pytest.raises(ConfigError, match="nn.Module"):
        lm.compress("resnet", train=_data(8, 0), val=_data(8, 1), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"\(input tensor, target\)"):
        lm.compress(Net(), train=[1, 2, 3], val=_data(8, 1), run_dir=tmp_path)


def test_config_data_from_a_python_factory(tmp_path):
    """data: python:file.py:factory and model: file.py:factory in a config."""
    from layermerge.pipeline import compress as run_config
    from layermerge.pipeline import parse_config

    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "from torch import nn\n"
        "from torch.utils.data import TensorDataset\n\n"
        "def model():\n"
        "    layers = [nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]\n"
        "    for _ in range(4):\n"
        "        layers += [nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]\n"
        "    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))\n\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(40, 1, 16, 16, generator=g), torch.arange(40) % 2\n"
        "    return {'train': TensorDataset(x[:24], y[:24]), 'val': TensorDataset(x[24:], y[24:])}\n"
    )
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    import importlib.util

    spec = importlib.util.spec_from_file_location("mine_for_test", tmp_path / "mine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.save(mod.model().state_dict(), weights)
    cfg = parse_config(
        {
            "model": f"{tmp_path / 'mine.py'}:model",
            "data": f"python:{tmp_path / 'mine.py'}:data",
            "input_shape": [1, 16, 16],
            "train": None,
            "weights": str(weights),
            "solve": {"methods": ["layermerge"], "budgets": [0.8], "precision": 10000.0},
            **{k: v for k, v in FAST.items() if k != "solve"},
            "latency": {"backends": ["torch"], "max_time_s": 0.01},
            "export": {"formats": ["onnx"]},
        }
    )
    res = run_config(cfg, tmp_path / "run", log=lambda m: None)
    report = json.loads((res.run_dir / "report.json").read_text())
    assert report["data"].startswith(f"python:{tmp_path / 'mine.py'}:data@")
    assert report["base"]["accuracy"] >= 0
    assert report["rows"]
    for row in report["rows"]:
        # a registry (or file.py:factory) model: load_shipped rebuilds it from model.json
        net = lm.load_shipped((res.run_dir / row["files"]["onnx"]).parent)
        x = torch.randn(2, 1, 16, 16)
        with torch.no_grad():
            ref = net(x)
        got = run_onnx(load_onnx(res.run_dir / row["files"]["onnx"]), x)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    with pytest.raises(lm.pipeline.ConfigError, match="defines no function"):
        run_config(
            dataclasses.replace(cfg, data=f"python:{tmp_path / 'mine.py'}:nope"),
            tmp_path / "run2",
            log=lambda m: None,
        )


def test_a_custom_metric_is_the_reported_quality(tmp_path):
    calls = []

    def top2(out, y):
        calls.append(len(y))
        return (out.topk(2, dim=1).indices == y[:, None]).any(1).float().mean()

    torch.manual_seed(1)
    res = lm.compress(
        Net(),
        train=_data(24, 0),
        val=_data(12, 1),
        budgets=[0.8],
        run_dir=tmp_path / "run",
        metric=top2,
        log=lambda m: None,
        **{**FAST, "latency": {"backends": ["torch"], "max_time_s": 0.01}},
    )
    report = json.loads((res.run_dir / "report.json").read_text())
    assert report["metrics"][0]["key"] == "metric" and report["metrics"][0]["label"] == "top2"
    assert 0.0 <= report["base"]["metric"] <= 1.0
    assert calls
    assert "top2" in res.report.read_text()
