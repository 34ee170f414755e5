"""Importance tables: entries and their plans, row values, seeds, resumption
(including after kill -9) and use by the solver."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.calibration import calibration_path
from layermerge.importance import (
    build_importance_tables,
    default_conv_out,
    drop_conv_plan,
    entry_seed,
    get_protocol,
    importance_entries,
    reducible_convs,
    single_block_plan,
)
from layermerge.plan import Plan
from layermerge.solve import solve_tables
from layermerge.tables import TableError, read_partial, read_table, write_table
from layermerge.tasks import ClassificationTask
from layermerge.train import Recipe, fit, importance_recipe, save_state_dict

from .helpers import KW, MODEL, SHAPE, write_mnist_like

HOLDOUT = 4
RECIPE = importance_recipe(batch_size=8)
# the paper's protocol at this size: what `layermerge importance --protocol reference
# --batch-size 8 --holdout-per-class 4` runs
PROTOCOL = get_protocol("reference", batch_size=8, holdout_per_class=HOLDOUT)
CALIBRATION = PROTOCOL.calibration  # identity-plan entries measured before the others


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A briefly trained tiny ResNet, its search space, data, and a table built in one go.
    On one thread (``one_thread``, until the module ends): the CLI runs below use
    --threads 1, the same arithmetic (and one thread is the fastest for tiny networks on a
    shared machine)."""
    root = tmp_path_factory.mktemp("imp")
    data = write_mnist_like(root / "mnist", n_train=120, n_test=20)
    task = ClassificationTask()
    splits = task.make_data(f"mnist:{data}", SHAPE, holdout_per_class=HOLDOUT)
    torch.manual_seed(0)
    loaded = load_model(MODEL, KW, None, SHAPE)
    fit(loaded.model, task, splits.train, Recipe(steps=8, batch_size=32, lr=0.05), progress=False)
    weights = save_state_dict(loaded.model, root / "base.pt")
    traced = trace(loaded.model, SHAPE)
    space = build_space(traced.chain, conv_weights(traced))
    out = root / "one_go" / "I.csv"
    t0 = time.time()
    res = build_importance_tables(
        traced, space, task, splits, out, protocol=PROTOCOL, progress=False
    )
    return {
        "root": root,
        "data": data,
        "task": task,
        "splits": splits,
        "traced": traced,
        "space": space,
        "weights": weights,
        "out": out,
        "result": res,
        "seconds": time.time() - t0,
    }


def test_entries_cover_options_and_reducible_convs(setup):
    space = setup["space"]
    entries = importance_entries(space)
    convs = reducible_convs(space)
    assert len(entries) == len(space.options) + len(convs)
    assert [e.key for e in entries[: len(space.options)]] == [o.key for o in space.options]
    assert [e.key for e in entries[len(space.options) :]] == convs
    assert all(not space.chain.conv(i).irreducible for i in convs)
    for e in entries:
        space.check_plan(e.plan)  # every plan is valid for the model
    o = next(o for o in space.options if o.length == 2 and len(o.kept_convs) == 1)
    p = single_block_plan(space, o)
    assert o in p.blocks and all(b.length == 1 for b in p.blocks if b is not o)
    assert len(p.blocks) == space.chain.length - 1
    d = drop_conv_plan(space, convs[0])
    assert d.method == "layerprune" and d.block_of(convs[0]).kept_convs == ()
    assert len(d.kept_convs) == space.chain.length - 1


def test_entry_seed_depends_on_key_only():
    a = entry_seed(0, "importance", (0, 2, 5, 1, False))
    assert a == entry_seed(0, "importance", (0, 2, 5, 1, False))
    assert a != entry_seed(0, "importance", (0, 2, 3, 1, False))
    assert a != entry_seed(1, "importance", (0, 2, 5, 1, False))
    assert entry_seed(0, "conv_importance", 3) != entry_seed(0, "conv_importance", 4)
    assert 0 <= a < 2**62


def test_table_values_and_meta(setup):
    space, out = setup["space"], setup["out"]
    imp = read_table(out, "importance")
    conv = read_table(default_conv_out(out), "conv_importance")
    assert default_conv_out(out).name == "I.conv.csv"
    assert imp.keys() == [o.key for o in space.options]
    assert [r["kept_convs"] for r in imp.rows] == [o.kept_convs for o in space.options]
    assert conv.keys() == reducible_convs(space)
    m = imp.meta
    assert m["model_fingerprint"] == space.fingerprint and m["chain_length"] == 6
    assert m["holdout_train_size"] == m["holdout_val_size"] == 4 * HOLDOUT
    assert m["recipe"] == RECIPE.to_dict()  # the reference's: lr 0.1, weight decay 1e-5
    assert m["complete"] is True and m["entries"] == len(space.options)
    assert m["base_val_acc"] == m["base"]["val"]["accuracy"]
    base = setup["result"].base
    assert m["base_val_loss"] == base["val"]["loss"]
    assert m["protocol"] == "reference" and m["score"] == "acc"
    # entries are scored against the calibrated base: the mean of the identity plan's
    # entries under the same protocol (recorded with their SD in the sidecar)
    cal = m["calibration"]
    records = json.loads(calibration_path(out).read_text())["entries"]
    assert cal["seeds"] == CALIBRATION == len(records)
    accs = [r["val_accuracy"] for r in records]
    assert cal["val_accuracy"]["mean"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert cal["val_accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1), abs=1e-12)
    assert [r["seed"] for r in records] == [entry_seed(0, "calibration", k) for k in range(3)]
    for t in (imp, conv):
        for r in t.rows:
            assert r["importance"] == pytest.approx(math.exp(r["delta_acc"] / 100), rel=1e-12)
            mean_acc, mean_loss = cal["val_accuracy"]["mean"], cal["val_loss"]["mean"]
            assert r["delta_acc"] == pytest.approx(r["val_acc"] - mean_acc, abs=1e-9)
            assert r["delta_loss"] == pytest.approx(r["val_loss"] - mean_loss, abs=1e-9)
            # accuracies are percentages of 16 images
            assert (r["val_acc"] * 16 / 100) == pytest.approx(round(r["val_acc"] * 16 / 100))
            assert r["seed"] == entry_seed(0, t.kind, t.key_of(r))


def _proxy_latency(space, path: Path) -> Path:
    """Latency proportional to the merged conv's multiply-adds (a stand-in table)."""
    rows = []
    for r in space.option_rows():
        c = space.chain.conv(r["kept_convs"][0])
        h, w = space.chain.nodes[r["end"]].shape[-2:]
        rows.append({**r, "latency_ms": 1e-4 * r["kernel"] ** 2 * c.out_channels * h * w})
    return write_table(path, "latency", rows, {**space.table_meta(), "constant_ms": 0.1})


def test_solver_reads_the_tables(setup, tmp_path):
    space, out = setup["space"], setup["out"]
    lat = read_table(_proxy_latency(space, tmp_path / "T.csv"))
    imp = read_table(out)
    sol = solve_tables(lat, imp, budget_frac=0.8, score="additive")
    space.check_plan(sol.plan)
    assert (
        sol.predicted_latency_ms
        <= 0.8 * (0.1 + sum(r["latency_ms"] for r in lat.rows if r["end"] - r["start"] == 1)) + 1e-9
    )
    pruned = solve_tables(
        lat,
        None,
        method="layerprune",
        conv_importance=read_table(default_conv_out(out)),
        budget_frac=0.9,
    )
    space.check_plan(pruned.plan)


def test_resume_gives_identical_table(setup, tmp_path):
    s = setup
    out = tmp_path / "I.csv"
    args = (s["traced"], s["space"], s["task"], s["splits"], out)
    # the calibration entries come first and count towards the limit
    first = build_importance_tables(*args, protocol=PROTOCOL, progress=False, limit=5)
    assert first.measured == 5 and len(read_partial(out).rows) == 5 - CALIBRATION
    assert not default_conv_out(out).exists()  # the per-conv entries come after the options
    with open(out, "a") as f:
        f.write("0,2,5,0,1 2,0.9")  # a line torn by a crash
    second = build_importance_tables(*args, protocol=PROTOCOL, progress=False)
    total = 12 + CALIBRATION  # 7 options, 5 convs, the calibration
    assert second.skipped == 5 and second.measured == total - 5
    assert out.read_bytes() == s["out"].read_bytes()
    conv = default_conv_out(out)
    assert conv.read_bytes() == default_conv_out(s["out"]).read_bytes()
    assert calibration_path(out).read_bytes() == calibration_path(s["out"]).read_bytes()
    # a finished table has nothing left to do
    third = build_importance_tables(*args, protocol=PROTOCOL, progress=False)
    assert third.measured == 0 and out.read_bytes() == s["out"].read_bytes()


def test_resume_refuses_other_settings(setup, tmp_path):
    s = setup
    out = tmp_path / "I.csv"
    args = (s["traced"], s["space"], s["task"], s["splits"], out)
    build_importance_tables(
        *args, protocol=PROTOCOL, progress=False, limit=CALIBRATION + 1, conv_out=False
    )
    other = importance_recipe(batch_size=8, lr=0.05)
    with pytest.raises(TableError, match="cannot resume .* recipe="):
        build_importance_tables(*args, protocol=PROTOCOL, recipe=other, conv_out=False)
    # the calibration file alone refuses too (a run stopped during the calibration)
    out.unlink()
    with pytest.raises(TableError, match="cannot resume the calibration .* recipe="):
        build_importance_tables(*args, protocol=PROTOCOL, recipe=other, conv_out=False)


def test_a_second_writer_is_refused_before_any_work(setup, tmp_path, monkeypatch):
    """The outputs are locked before the base network is measured: a second build of
    the same table (or its per-conv table) is refused at once, nothing measured."""
    import layermerge.importance as imp
    from layermerge.fileio import FileLock, LockError

    s = setup
    out = tmp_path / "I.csv"
    calls = []
    monkeypatch.setattr(imp, "measure_base", lambda *a, **k: calls.append(1))
    args = (s["traced"], s["space"], s["task"], s["splits"], out)
    for held in (out, default_conv_out(out)):
        with FileLock(held), pytest.raises(LockError, match="is writing .*I"):
            build_importance_tables(*args, protocol=PROTOCOL, progress=False)
    assert calls == [] and not out.exists() and not list(tmp_path.glob("*.lock"))


def test_finish_removes_the_shards_and_their_leftover_temporary_files(tmp_path):
    """Rank 0 merges the shards into the table and removes each shard's CSV, sidecar
    and the temporary file of an interrupted write, leaving only the table."""
    from layermerge.importance import _finish, shard_path

    meta = {"model_fingerprint": "f", "chain_length": 3}
    cols = ["conv", "importance", "seed"]
    out = tmp_path / "I.conv.csv"
    write_table(shard_path(out, 0), "conv_importance", [{"conv": 1, "importance": 1.0, "seed": 1}],
                meta, cols)  # fmt: skip
    write_table(shard_path(out, 1), "conv_importance", [{"conv": 2, "importance": 0.5, "seed": 2}],
                meta, cols)  # fmt: skip
    (tmp_path / f".{shard_path(out, 1).name}.tmp-deadbeef").write_text("torn")
    _finish(out, "conv_importance", cols, meta, [1, 2], 1.0)
    assert read_table(out, "conv_importance").keys() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, out.name + ".meta.json"]


def test_reinit_only_changes_single_conv_entries(setup, tmp_path):
    s = setup
    out = tmp_path / "I.csv"
    build_importance_tables(
        s["traced"],
        s["space"],
        s["task"],
        s["splits"],
        out,
        protocol=PROTOCOL,
        reinit="none",
        conv_out=False,
        progress=False,
    )
    a, b = read_table(out), read_table(s["out"])
    single = [r["end"] - r["start"] == 1 for r in b.rows]
    same = [ra["val_loss"] == rb["val_loss"] for ra, rb in zip(a.rows, b.rows)]
    assert all(same[i] for i in range(len(same)) if not single[i])
    assert not all(same[i] for i in range(len(same)) if single[i])


def test_kill_9_and_rerun_cli(setup, tmp_path):
    """The command killed mid-run (SIGKILL) and rerun writes the same table."""
    s = setup
    out = tmp_path / "I.csv"
    cmd = [
        sys.executable, "-m", "layermerge.cli", "importance", MODEL,
        "--model-kwargs", json.dumps(KW), "--input-shape", "1,8,8",
        "--weights", str(s["weights"]), "--data", f"mnist:{s['data']}",
        "--protocol", "reference", "--holdout-per-class", str(HOLDOUT), "--batch-size", "8",
        "--threads", "1", "--out", str(out), "--no-progress", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 4:  # header + 3 rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = out.read_text().count("\n") - 1
    assert 3 <= partial < len(s["space"].options)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["skipped"] >= 3 + CALIBRATION
    assert summary["skipped"] + summary["measured"] == 12 + CALIBRATION
    assert out.read_bytes() == s["out"].read_bytes()
    # the same calibration entries (the settings also name the CLI's model spec)
    entries = [json.loads(calibration_path(p).read_text())["entries"] for p in (out, s["out"])]
    assert entries[0] == entries[1]
    assert summary["noise_floor"] == summary["calibration"]["val_accuracy"]["sd"]
    assert default_conv_out(out).read_bytes() == default_conv_out(s["out"]).read_bytes()
    meta = json.loads(Path(str(out) + ".meta.json").read_text())
    assert meta["model"] == MODEL and json.loads(meta["model_kwargs"]) == KW
    assert np.isfinite(meta["base_val_acc"])


def test_cli_latency_without_weights_pairs_with_importance_on_trained_weights(setup, tmp_path):
    """`latency` on the untrained model + `importance` with trained weights + `solve`:
    the tables join, and the plan keeps the convs chosen on the trained weights."""
    s = setup
    # "trained" weights whose L1 norms choose other convs than the seed-0 initialisation
    other = load_model(MODEL, KW, None, SHAPE, seed=3)
    trained = save_state_dict(other.model, tmp_path / "trained.pt")
    base = ["--model-kwargs", json.dumps(KW), "--input-shape", ",".join(map(str, SHAPE))]
    lat, imp, plan_file = tmp_path / "T.csv", tmp_path / "I.csv", tmp_path / "plan.json"
    runs = [
        ["latency", MODEL, *base, "--backend", "torch", "--threads", "1", "--max-time", "0.02",
         "--out", str(lat), "--no-progress"],
        ["importance", MODEL, *base, "--weights", str(trained), "--data", f"mnist:{s['data']}",
         "--holdout-per-class", str(HOLDOUT), "--batch-size", "8", "--threads", "1",
         "--out", str(imp), "--no-progress"],
        ["solve", "--latency", str(lat), "--importance", str(imp), "--budget-frac", "1.0",
         "--out", str(plan_file)],
    ]  # fmt: skip
    for argv in runs:
        done = subprocess.run(
            [sys.executable, "-m", "layermerge.cli", *argv], capture_output=True, text=True
        )
        assert done.returncode == 0, (argv[0], done.stderr)
    lat_kept = {t: r["kept_convs"] for t, r in zip(*_keyed(read_table(lat, "latency")))}
    imp_kept = {t: r["kept_convs"] for t, r in zip(*_keyed(read_table(imp, "importance")))}
    assert any(lat_kept[k] != imp_kept[k] for k in imp_kept), "the weights must disagree"
    plan = Plan.load(plan_file)
    for b in plan.blocks:
        assert b.kept_convs == imp_kept[b.key]


def _keyed(table):
    return [table.key_of(r) for r in table.rows], table.rows
