"""Importance protocols: the registry, holdout sizes, the calibration (identity plan
scored neutral, noise floor, part of resuming), BatchNorm recalibration and the KL
score."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from layermerge import build_space, conv_weights, load_model, trace
from layermerge.calibration import (
    calibrated_base,
    calibration_path,
    noise_floor,
    recalibrate_batchnorm,
    spread,
    summarize,
)
from layermerge.importance import (
    DEFAULT_PROTOCOL,
    PROTOCOLS,
    ImportanceResult,
    build_importance_tables,
    get_protocol,
    importance_entries,
    protocol_splits,
)
from layermerge.tables import read_table
from layermerge.tasks import ClassificationTask
from layermerge.train import Recipe, fit

from .helpers import KW, MODEL, SHAPE, write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")

# small versions of the registry's cheap protocols (same kind of work, fewer images)
BN = get_protocol("bn-recalib", batch_size=8, holdout_images=24, bn_batches=2)
FEW = get_protocol("few-steps", batch_size=8, holdout_images=24)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    data = write_mnist_like(root / "mnist", n_train=120, n_test=20)
    task = ClassificationTask()
    splits = task.make_data(f"mnist:{data}", SHAPE)
    torch.manual_seed(0)
    loaded = load_model(MODEL, KW, None, SHAPE)
    fit(loaded.model, task, splits.train, Recipe(steps=8, batch_size=32, lr=0.05), progress=False)
    traced = trace(loaded.model, SHAPE)
    space = build_space(traced.chain, conv_weights(traced))
    return root, task, splits, traced, space


def test_registry_and_overrides():
    assert DEFAULT_PROTOCOL == "default"
    assert {"default", "few-steps", "bn-recalib", "reference"} <= set(PROTOCOLS)
    d = PROTOCOLS["default"]
    # defined in optimiser steps, a warm-up, no re-initialisation; holdout-train feeds
    # every step with new images
    assert d.steps == 20 and d.epochs is None and d.warmup_steps > 0 and d.reinit == "none"
    assert d.holdout_images >= d.steps * d.batch_size and d.calibration >= 3
    r = PROTOCOLS["reference"]
    assert (r.epochs, r.batch_size, r.lr, r.holdout_per_class, r.reinit, r.score) == (
        1.0, 256, 0.1, 50, "single", "acc",
    )  # fmt: skip
    # the cheap protocols cost at most a tenth of the default's image passes
    for name in ("few-steps", "bn-recalib"):
        assert PROTOCOLS[name].nominal_cost(10) <= 0.1 * d.nominal_cost(10), name
    assert d.recipe().steps == 20 and d.recipe().warmup_steps == d.warmup_steps
    p = get_protocol("default", holdout_per_class=7, epochs=2.0, lr=0.05)
    assert (p.holdout_per_class, p.holdout_images, p.epochs, p.steps, p.lr) == (
        7, None, 2.0, 0, 0.05,
    )  # fmt: skip
    assert p.recipe().epochs == 2.0 and p.recipe().steps is None
    with pytest.raises(ValueError, match="unknown importance protocol 'nope'; one of default"):
        get_protocol("nope")


def test_holdout_size_from_the_protocol(tiny):
    _, _, splits, _, _ = tiny
    s = protocol_splits(splits, get_protocol("default", holdout_images=40))
    assert len(s.holdout_train) == len(s.holdout_val) == 40  # 10 per class of 4
    # more than the data holds: half of the smallest class each (disjoint splits)
    s = protocol_splits(splits, PROTOCOLS["default"])
    assert len(s.holdout_train) == len(s.holdout_val) == 4 * 15
    assert not set(s.holdout_train.indices) & set(s.holdout_val.indices)
    assert (
        protocol_splits(splits, get_protocol("default", holdout_per_class=3)).holdout_per_class == 3
    )


def test_recalibrate_batchnorm_changes_statistics_only(tiny):
    _, _, splits, traced, _ = tiny
    net = traced.model
    params = {k: v.clone() for k, v in net.named_parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    import copy

    other = copy.deepcopy(net)
    holdout = protocol_splits(splits, BN).holdout_train
    recalibrate_batchnorm(other, holdout, 2, 8, seed=1)
    after = {k: v for k, v in other.state_dict().items() if "running" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(params[k], v) for k, v in other.named_parameters())
    bns = [m for m in other.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.momentum == 0.1 for m in bns) and not other.training
    # the same seed, the same batches: the same statistics
    again = copy.deepcopy(net)
    recalibrate_batchnorm(again, holdout, 2, 8, seed=1)
    assert all(torch.equal(after[k], again.state_dict()[k]) for k in after)


def test_bn_recalib_table_calibrated_and_identical_however_built(tiny, tmp_path):
    """One go, or one entry per run (calibration included): the same bytes; the
    identity plan scores neutral against the calibrated base."""
    _, task, splits, traced, space = tiny
    args = (traced, space, task, splits)
    one = tmp_path / "one" / "I.csv"
    res = build_importance_tables(*args, one, protocol=BN, progress=False)
    n = len(importance_entries(space)) + BN.calibration
    assert res.measured == n and res.score == "kl"
    t = read_table(one)
    m = t.meta
    assert m["protocol"] == "bn-recalib" and m["recipe"] == {"seed": 0} and m["bn_batches"] == 2
    assert m["holdout_val_size"] == 24
    cal = m["calibration"]
    records = json.loads(calibration_path(one).read_text())["entries"]
    assert cal["seeds"] == 3 == len(records)
    kls = [r["val_kl"] for r in records]
    assert all(k >= 0 for k in kls) and cal["val_kl"]["sd"] == pytest.approx(np.std(kls, ddof=1))
    # each seed recalibrates on other batches of the protocol's size (8 of 24 images)
    assert len(set(kls)) == 3 and cal["val_kl"]["sd"] > 0
    assert res.noise_floor == cal["val_kl"]["sd"]
    for r in t.rows:
        assert r["delta_kl"] == pytest.approx(r["kl"] - cal["val_kl"]["mean"], abs=1e-12)
        assert r["importance"] == pytest.approx(math.exp(-r["delta_kl"]), rel=1e-12)
    assert res.spread == pytest.approx(np.std([r["delta_kl"] for r in t.rows], ddof=1))
    # the identity plan, scored against the calibrated base, is neutral on average
    base = calibrated_base(summarize({r["index"]: r for r in records}), res.base)
    for score in ("acc", "loss", "kl"):
        vals = [
            task.importance_values(
                base,
                {"val": {"accuracy": r["val_accuracy"], "loss": r["val_loss"], "kl": r["val_kl"]}},
                score,
            )  # fmt: skip
            for r in records
        ]
        deltas = [
            v[{"acc": "delta_acc", "loss": "delta_loss", "kl": "delta_kl"}[score]] for v in vals
        ]
        assert np.mean(deltas) == pytest.approx(0.0, abs=1e-12)
        assert math.exp(np.mean(deltas)) == pytest.approx(1.0)

    steps = tmp_path / "steps" / "I.csv"
    runs = 0
    while True:
        r = build_importance_tables(*args, steps, protocol=BN, progress=False, limit=1)
        runs += 1
        if r.spread is not None:  # finished
            break
        assert runs <= n
    assert runs == n  # the last run measures the last entry and finishes the tables
    for a, b in ((one, steps), (one.with_name("I.conv.csv"), steps.with_name("I.conv.csv"))):
        assert a.read_bytes() == b.read_bytes()
    assert calibration_path(one).read_bytes() == calibration_path(steps).read_bytes()


def test_few_steps_protocol_and_scores(tiny, tmp_path):
    _, task, splits, traced, space = tiny
    out = tmp_path / "I.csv"
    res = build_importance_tables(
        traced, space, task, splits, out, protocol=FEW, score="acc", conv_out=False,
        progress=False,
    )  # fmt: skip
    t = read_table(out)
    assert t.meta["score"] == "acc" and t.meta["recipe"]["steps"] == 2
    # every score's columns are kept, whichever made `importance`
    for r in t.rows:
        assert {"delta_acc", "delta_loss", "delta_kl", "kl", "val_acc", "val_loss"} <= set(r)
        assert r["importance"] == pytest.approx(math.exp(r["delta_acc"] / 100), rel=1e-12)
    assert res.noise_floor == t.meta["calibration"]["val_accuracy"]["sd"]
    with pytest.raises(ValueError, match="scores importance by acc, loss, kl, not 'ratio'"):
        build_importance_tables(
            traced, space, task, splits, tmp_path / "x.csv", protocol=FEW, score="ratio"
        )


def test_noise_floor_and_spread_helpers():
    s = summarize({0: {"index": 0, "val_loss": 1.0, "seed": 1},
                   1: {"index": 1, "val_loss": 3.0, "seed": 2}})  # fmt: skip
    assert s == {"seeds": 2, "val_loss": {"mean": 2.0, "sd": math.sqrt(2.0)}}
    assert noise_floor(s, "loss") == math.sqrt(2.0)
    assert noise_floor(s, "loss_ratio") == pytest.approx(math.sqrt(2.0) / 2.0)
    assert noise_floor({"seeds": 0}, "loss") is None
    assert spread([{"delta_loss": 0.0}, {"delta_loss": 2.0}], "loss") == pytest.approx(math.sqrt(2))
    r = ImportanceResult(None, None, 0, 0, 0.0, {}, None, "loss", s, 1.0, 1.5)
    assert r.within_noise
    r.spread = 2.5
    assert not r.within_noise


def test_diffusion_task_scores_by_its_loss_ratio_only():
    from layermerge.diffusion import DiffusionTask

    task = DiffusionTask()
    assert task.importance_scores == ("loss_ratio",)
    base = {"train": {"loss": 1.0}, "val": {"loss": 1.0}}
    with pytest.raises(ValueError, match="loss_ratio only"):
        task.importance_values(base, base, "kl")
    assert task.importance_values(base, base)["importance"] == 1.0
