"""Several processes under torchrun (CPU, gloo): importance entries sharded over
ranks and merged by rank 0; DistributedDataParallel training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.distributed import DistInfo, all_reduce_sum, from_env
from layermerge.importance import build_importance_tables, default_conv_out, importance_entries
from layermerge.models import read_state_dict
from layermerge.tables import read_table
from layermerge.tasks import ClassificationTask
from layermerge.train import Recipe, fit, importance_recipe, save_state_dict

from .helpers import KW, MODEL, SHAPE, write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")

TORCHRUN = Path(sys.executable).with_name("torchrun")


# A network without BatchNorm: DDP over two ranks then computes exactly the gradient
# of one process on the union of their batches.
NO_BN_MODEL = """
import torch
from torch import nn


def tiny():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
    )
"""


def _torchrun(args: list[str], cwd: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(TORCHRUN), "--standalone", "--nproc_per_node", "2",
        "-m", "layermerge.cli", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_single_process_defaults(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    d = from_env()
    assert d == DistInfo(0, 1, 0) and d.is_main and not d.active
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, d) is t
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_env() == DistInfo(3, 4, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_mnist_like(root / "mnist", n_train=64, n_test=16)
    task = ClassificationTask()
    splits = task.make_data(f"mnist:{data}", SHAPE, holdout_per_class=3)
    torch.manual_seed(0)
    loaded = load_model(MODEL, KW, None, SHAPE)
    fit(loaded.model, task, splits.train, Recipe(steps=6, batch_size=32, lr=0.05), progress=False)
    return root, data, task, splits, loaded, save_state_dict(loaded.model, root / "base.pt")


def test_torchrun_importance_shards_cover_every_entry_once(trained):
    root, data, task, splits, loaded, weights = trained
    out = root / "ddp" / "I.csv"
    r = _torchrun(
        [
            "importance", MODEL, "--model-kwargs", json.dumps(KW), "--input-shape", "1,8,8",
            "--weights", str(weights), "--data", f"mnist:{data}", "--holdout-per-class", "3",
            "--protocol", "reference", "--batch-size", "6", "--out", str(out), "--no-progress",
            "--json",
        ],
        cwd=root,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])  # rank 0 prints the summary
    traced = trace(loaded.model, SHAPE)
    space = build_space(traced.chain, conv_weights(traced))
    entries = importance_entries(space)
    # the summary counts both ranks: the 3 calibration entries and every entry
    assert summary["measured"] == 3 + len(entries)
    imp, conv = read_table(out), read_table(default_conv_out(out))
    assert imp.keys() == [o.key for o in space.options]  # each option exactly once, in order
    assert conv.keys() == [e.key for e in entries if e.table == "conv_importance"]
    # shards merged and removed, with their locks and temporary files
    assert not list(out.parent.glob("*.shard*")) and not list(out.parent.glob(".*shard*"))
    assert not list(out.parent.glob("*.lock"))
    assert imp.meta["threads"] == 1 and imp.meta["complete"]

    # The same table from one process (same thread count): byte for byte.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = root / "single" / "I.csv"
        build_importance_tables(
            traced, space, task, splits, single, recipe=importance_recipe(batch_size=6),
            progress=False,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert single.read_bytes() == out.read_bytes()
    assert default_conv_out(single).read_bytes() == default_conv_out(out).read_bytes()
    # the calibration: measured on both ranks, merged by rank 0, the same entries
    cal = [json.loads(Path(f"{p}.calib.json").read_text())["entries"] for p in (single, out)]
    assert cal[0] == cal[1] and len(cal[0]) == 3
    assert imp.meta["calibration"] == read_table(single).meta["calibration"]


def test_torchrun_ddp_training_equals_one_process(trained, tmp_path):
    _, data, task, splits, _, _ = trained
    (tmp_path / "net.py").write_text(NO_BN_MODEL)
    spec = f"{tmp_path / 'net.py'}:tiny"
    common = [spec, "--input-shape", "1,8,8", "--data", f"mnist:{data}", "--no-progress"]
    recipe = ["--epochs", "2", "--batch-size", "16", "--lr", "0.05", "--no-augment"]
    r = _torchrun(["train", *common, *recipe, "--out", str(tmp_path / "ddp.pt")], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ddp.pt.ckpt").exists()
    ddp = read_state_dict(tmp_path / "ddp.pt")

    torch.manual_seed(0)
    model = load_model(spec, None, None, SHAPE).model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(not torch.equal(start[k], ddp[k]) for k in start)  # it trained
    fit(
        model,
        task,
        splits.train,
        Recipe(epochs=2, batch_size=16, lr=0.05, augment=False, weight_decay=5e-4),
        progress=False,
    )
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)
