"""The diffusion task (data in [-1, 1], denoising loss, reproducible evaluation,
importance), EMA in training, DDIM sampling and the diffusion commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from layermerge.cli import main as cli_main
from layermerge.data import Augment, make_splits
from layermerge.diffusion import DiffusionTask, NoiseSchedule, image_grid, image_seed, sample
from layermerge.models import load_model, read_state_dict
from layermerge.tasks import ClassificationTask
from layermerge.train import Recipe, WeightEMA, evaluate, fit

from .helpers import SHAPE, SMALL_UNET, small_unet, tiny_resnet, write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("mnist"), n_train=160, n_test=40)


@pytest.fixture(scope="module")
def splits(data_dir):
    return DiffusionTask().make_data(f"mnist:{data_dir}", (1, 8, 8), holdout_per_class=8)


# ---------------------------------------------------------------------------- data


def test_data_in_symmetric_range_padded_and_only_flipped(tmp_path):
    root = write_mnist_like(tmp_path, n_train=40, n_test=8, size=28)
    task = DiffusionTask(flip=True)
    sp = task.make_data(f"fashion-mnist:{root}", (1, 32, 32), holdout_per_class=2)
    raw = sp.train.source.images[:8].float()  # uint8 28x28
    x, _ = next(sp.train.batches(8, train=False))
    assert x.shape == (8, 1, 32, 32)
    # [0, 255] -> [-1, 1], the 28x28 image centred with 2 pixels of black (-1) around it
    assert torch.allclose(x[:, :, 2:30, 2:30], raw / 127.5 - 1.0, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, 0][:, border] == -1.0).all()
    # training augmentation: horizontal flips only, never shifts
    xt, _ = next(sp.train.batches(40, train=True, seed=3))
    ref = {tuple(v.flatten().tolist()) for v in next(sp.train.batches(40, train=False))[0]}
    flipped = sum(tuple(v.flatten().tolist()) not in ref for v in xt)
    assert all(
        tuple(v.flatten().tolist()) in ref or tuple(v.flip(-1).flatten().tolist()) in ref
        for v in xt
    )
    assert 0 < flipped < 40
    # classification data of the same files is unchanged (dataset mean/std, shifts)
    cls = ClassificationTask().make_data(f"fashion-mnist:{root}", (1, 32, 32), holdout_per_class=2)
    assert cls.transform.mean == (0.2860,) and cls.transform.augment == Augment(pad=2, flip=True)
    assert sp.transform.mean == (0.5,) and sp.transform.augment == Augment(flip=True)


def test_make_splits_normalization_option(data_dir):
    default = make_splits(f"mnist:{data_dir}", (1, 8, 8))
    same = make_splits(f"mnist:{data_dir}", (1, 8, 8), normalization=((0.1307,), (0.3081,)))
    a, b = next(default.test.batches(10))[0], next(same.test.batches(10))[0]
    assert torch.equal(a, b)
    sym = make_splits(f"mnist:{data_dir}", (3, 8, 8), normalization=((0.5,), (0.5,)))
    x = next(sym.test.batches(10))[0]
    assert x.shape == (10, 3, 8, 8) and x.min() >= -1.0 and x.max() <= 1.0
    assert torch.allclose(x, a[:, :1].mul(0.3081).add(0.1307).mul(2).sub(1).expand_as(x), atol=1e-5)
    with pytest.raises(ValueError):
        make_splits(f"mnist:{data_dir}", (1, 8, 8), normalization=((0.5,), (0.0,)))


# ---------------------------------------------------------------------------- loss


def test_noise_is_the_ddpm_forward_process():
    task = DiffusionTask()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    x, eps = torch.rand(3, 1, 4, 4) * 2 - 1, torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    want = abar[t].sqrt().view(-1, 1, 1, 1) * x + (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * eps
    # diffusers keeps the schedule in float32
    assert torch.allclose(task.add_noise(x, eps, t).double(), want, rtol=1e-4, atol=1e-5)
    other = DiffusionTask(NoiseSchedule(num_train_timesteps=10, beta_end=0.2))
    abar10 = torch.cumprod(1 - torch.linspace(1e-4, 0.2, 10, dtype=torch.float64), 0)
    got = other.add_noise(torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([9]))
    assert got.item() == pytest.approx(abar10[9].sqrt().item(), rel=1e-5)
    with pytest.raises(ValueError):
        NoiseSchedule(beta_start=0.1, beta_end=0.01)


class _Const(nn.Module):
    """Predicts eps = c everywhere: the loss is E|eps - c|^2 = 1 + c^2."""

    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t):
        return torch.zeros_like(x) + self.c


def test_training_loss_and_distillation():
    x = torch.zeros(4096, 1, 4, 4)
    batch = (x, torch.zeros(4096, dtype=torch.long))
    torch.manual_seed(0)
    plain = DiffusionTask().training_loss(_Const(0.5), batch)
    assert plain.item() == pytest.approx(1.25, rel=0.01)
    # distilling from a teacher that predicts the same: only the true-noise part is left
    kd = DiffusionTask(distill_weight=0.25)
    torch.manual_seed(0)
    assert kd.training_loss(_Const(0.5), batch, teacher=_Const(0.5)).item() == pytest.approx(
        0.75 * plain.item(), rel=1e-6
    )
    # teacher 0.0: (1 - w) * (1 + c^2) + w * c^2
    torch.manual_seed(0)
    got = kd.training_loss(_Const(0.5), batch, teacher=_Const(0.0)).item()
    assert got == pytest.approx(0.75 * plain.item() + 0.25 * 0.25, rel=1e-6)
    with pytest.raises(ValueError):
        DiffusionTask(distill_weight=1.5)


def test_evaluation_does_not_depend_on_batching_or_rank(splits):
    task = DiffusionTask(eval_draws=3)
    model = small_unet().eval()
    split = splits.holdout_val
    with torch.no_grad():
        whole = task.evaluation_sums(model, next(split.batches(len(split))))
        small = sum(task.evaluation_sums(model, b) for b in split.batches(5))
        ranks = sum(
            task.evaluation_sums(model, b)
            for r in range(3)
            for b in split.batches(4, rank=r, world=3)
        )
        x = next(split.batches(len(split)))[0]
        backwards = task.evaluation_sums(model, (x.flip(0), None))
    assert whole[1] == len(split) == 32
    for other in (small, ranks, backwards):
        assert torch.allclose(whole, other, rtol=1e-6, atol=0)
    # the noise of an image is a function of the image and the seed, nothing else
    n1, t1 = task.evaluation_noise(x[:4])
    n2, t2 = task.evaluation_noise(x[[3, 2, 1, 0]])
    assert torch.equal(n1[:, 0], n2[:, 3]) and torch.equal(t1[:, 0], t2[:, 3])
    # stratified timesteps: draw j of 3 falls in [j T / 3, (j + 1) T / 3)
    assert (
        (t1 >= torch.tensor([[0], [333], [666]])) & (t1 < torch.tensor([[334], [667], [1000]]))
    ).all()
    assert image_seed(1, x[0]) != image_seed(0, x[0])
    other_seed = DiffusionTask(eval_seed=1, eval_draws=3).evaluation_sums(model, (x, None))
    assert not torch.allclose(whole, other_seed)
    metrics = task.metrics(whole)
    assert set(metrics) == {"loss"} and metrics["loss"] == pytest.approx(whole[0].item() / 32)


def test_importance_values():
    task = DiffusionTask()
    base = {"train": {"loss": 0.05}, "val": {"loss": 0.04}}
    got = task.importance_values(base, {"train": {"loss": 0.055}, "val": {"loss": 0.05}})
    assert got["loss_ratio"] == pytest.approx(0.25)
    assert got["importance"] == pytest.approx(math.exp(-0.25))
    assert got["delta_loss"] == pytest.approx(0.01)
    assert (got["val_loss"], got["train_loss"]) == (0.05, 0.055)
    assert set(got) == {"importance", *task.importance_columns}
    same = task.importance_values(base, {"train": {"loss": 1.0}, "val": {"loss": 0.04}})
    assert same["importance"] == 1.0


def test_fit_lowers_the_denoising_loss(splits):
    task = DiffusionTask()
    model = small_unet()
    before = evaluate(model, task, splits.holdout_val)["loss"]
    recipe = Recipe(steps=25, batch_size=32, optimizer="adamw", lr=3e-3, weight_decay=0)
    res = fit(model, task, splits.train, recipe, eval_split=splits.holdout_val, progress=False)
    after = evaluate(model, task, splits.holdout_val)["loss"]
    assert before > 0.9 and after < 0.5 * before
    assert res.history[-1]["holdout-val_loss"] == pytest.approx(after, rel=1e-9)


# ---------------------------------------------------------------------------- EMA


@pytest.fixture(scope="module")
def cls_splits(data_dir):
    return ClassificationTask().make_data(f"mnist:{data_dir}", SHAPE, holdout_per_class=8)


def test_ema_off_is_the_previous_behaviour(cls_splits, tmp_path):
    task = ClassificationTask()
    # the recipe's JSON (checkpoints, importance metadata) has no new key while EMA is off
    old_keys = {
        "epochs", "steps", "batch_size", "optimizer", "lr", "momentum", "nesterov",
        "weight_decay", "warmup_epochs", "min_lr", "grad_clip", "amp", "seed",
        "eval_batch_size", "augment",
    }  # fmt: skip
    assert set(Recipe().to_dict()) == old_keys
    assert set(Recipe(ema_decay=0.9).to_dict()) == old_keys | {"ema_decay"}
    a, b = tiny_resnet(), tiny_resnet()
    recipe = Recipe(epochs=2, batch_size=48, lr=0.05)
    fit(a, task, cls_splits.train, recipe, checkpoint=tmp_path / "a.ckpt", progress=False)
    fit(b, task, cls_splits.train, Recipe(epochs=2, batch_size=48, lr=0.05, ema_decay=0.0),
        progress=False)  # fmt: skip
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert "ema" not in state and "ema_decay" not in json.loads(state["recipe"])
    # an EMA run refuses that checkpoint (another recipe), and vice versa
    from layermerge.train import TrainingError

    with pytest.raises(TrainingError, match="ema_decay"):
        fit(tiny_resnet(), task, cls_splits.train, Recipe(epochs=2, batch_size=48, lr=0.05,
            ema_decay=0.9), checkpoint=tmp_path / "a.ckpt", progress=False)  # fmt: skip


def test_ema_is_the_average_of_the_weights(cls_splits):
    task = ClassificationTask()
    init = tiny_resnet()
    raw = tiny_resnet()
    fit(raw, task, cls_splits.train, Recipe(steps=1, batch_size=48, lr=0.05), progress=False)
    ema = tiny_resnet()
    fit(ema, task, cls_splits.train, Recipe(steps=1, batch_size=48, lr=0.05, ema_decay=0.99),
        progress=False)  # fmt: skip
    # after one step the warm-up decay is min(0.99, 1 / 10) = 0.1
    assert WeightEMA(init, 0.99).rate(1) == pytest.approx(0.1)
    assert WeightEMA(init, 0.99).rate(10_000) == 0.99
    params = {n for n, _ in init.named_parameters()}
    i, r, e = init.state_dict(), raw.state_dict(), ema.state_dict()
    for k in i:
        if k in params:
            assert torch.allclose(e[k], 0.1 * i[k] + 0.9 * r[k], atol=1e-6), k
        else:  # BatchNorm statistics are copied
            assert torch.equal(e[k], r[k]), k
    assert not all(torch.equal(e[k], r[k]) for k in params)


class _Stop(Exception):
    pass


def _stop_after_first(record):
    if record["epoch"] == 1:
        raise _Stop


def test_ema_resumes_exactly(splits, tmp_path):
    task = DiffusionTask()
    recipe = Recipe(
        epochs=2, batch_size=48, optimizer="adamw", lr=2e-3, weight_decay=0, ema_decay=0.9
    )
    straight = small_unet()
    r1 = fit(straight, task, splits.train, recipe, eval_split=splits.holdout_val,
             checkpoint=tmp_path / "a.ckpt", progress=False)  # fmt: skip
    with pytest.raises(_Stop):
        fit(small_unet(), task, splits.train, recipe, eval_split=splits.holdout_val,
            checkpoint=tmp_path / "b.ckpt", progress=False, on_epoch_end=_stop_after_first)  # fmt: skip
    assert "ema" in torch.load(tmp_path / "b.ckpt", weights_only=True)
    resumed = small_unet(seed=7)
    r2 = fit(resumed, task, splits.train, recipe, eval_split=splits.holdout_val,
             checkpoint=tmp_path / "b.ckpt", progress=False)  # fmt: skip
    assert r2.resumed_from_epoch == 1
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["holdout-val_loss"] for h in r1.history] == [
        h["holdout-val_loss"] for h in r2.history
    ]
    # the evaluated and returned weights are the average
    assert r1.history[-1]["holdout-val_loss"] == pytest.approx(
        evaluate(straight, task, splits.holdout_val)["loss"], rel=1e-12
    )


# ---------------------------------------------------------------------------- sampling


def test_sample_is_deterministic_and_batch_independent():
    unet = small_unet()
    a = sample(unet, 3, steps=4, seed=5, batch_size=3)
    b = sample(unet, 3, steps=4, seed=5, batch_size=2)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert torch.equal(a, sample(unet, 3, steps=4, seed=5, batch_size=3))
    assert torch.allclose(a, b, atol=1e-5)  # image i depends on (seed, i) only
    assert not torch.allclose(a, sample(unet, 3, steps=4, seed=6, batch_size=3))
    assert not torch.allclose(a[0], a[1])
    stochastic = sample(unet, 3, steps=4, seed=5, eta=1.0)
    assert torch.equal(stochastic, sample(unet, 3, steps=4, seed=5, eta=1.0))
    assert not torch.allclose(a, stochastic)
    assert torch.get_num_threads() == 1


def test_sample_any_module_the_same_as_the_unet():
    unet = small_unet()

    class Plain(nn.Module):  # returns a tensor and takes batched timesteps
        def __init__(self):
            super().__init__()
            self.inner = unet

        def forward(self, x, t):
            assert t.shape == (x.shape[0],)
            return self.inner(x, t).sample

    want = sample(unet, 2, steps=3, seed=1)
    got = sample(Plain(), 2, steps=3, seed=1, sample_shape=(1, 8, 8))
    assert torch.allclose(want, got, atol=1e-6)
    with pytest.raises(ValueError, match="sample_shape"):
        sample(Plain(), 2, steps=3)


def test_image_grid():
    images = torch.linspace(-1, 1, 5 * 2 * 3).view(5, 1, 2, 3)
    grid = image_grid(images, nrow=2, pad=1)
    assert grid.size == (2 * 4 + 1, 3 * 3 + 1) and grid.mode == "L"
    arr = np.asarray(grid)
    assert arr[1, 1] == 0 and arr[2, 3] == round((images[0, 0, 1, 2].item() + 1) * 127.5)


# ---------------------------------------------------------------------------- commands


def test_diffusion_commands(data_dir, tmp_path, capsys):
    model = ["diffusers:ddpm-small", "--model-kwargs", json.dumps(SMALL_UNET)]
    data = ["--data", f"mnist:{data_dir}"]
    w = tmp_path / "unet.pt"
    common = ["--threads", "1", "--no-progress", "--json"]
    assert cli_main(["train", *model, *data, "--task", "diffusion", "--steps", "6",
                     "--batch-size", "32", "--optimizer", "adamw", "--lr", "2e-3",
                     "--weight-decay", "0", "--ema-decay", "0.9", "--eval-draws", "2",
                     "--out", str(w), *common]) == 0  # fmt: skip
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["steps"] == 6 and "test_loss" in trained and "test_accuracy" not in trained
    assert "ema" in torch.load(str(w) + ".ckpt", weights_only=True)
    # the saved weights are the evaluated (EMA) ones
    assert cli_main(["evaluate", *model, "--weights", str(w), *data, "--task", "diffusion",
                     "--eval-draws", "2", *common]) == 0  # fmt: skip
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["loss"] == pytest.approx(trained["test_loss"], rel=1e-9)

    grid = tmp_path / "grid.png"
    st = tmp_path / "s.safetensors"
    assert cli_main(["sample", *model, "--weights", str(w), "--n", "6", "--steps", "3",
                     "--nrow", "3", "--out", str(grid), "--save-tensor", str(st), *common]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from PIL import Image

    assert out["n"] == 6 and Image.open(grid).size == (3 * 10 + 2, 2 * 10 + 2)
    unet = load_model("diffusers:ddpm-small", SMALL_UNET, w).model
    assert torch.allclose(read_state_dict(st)["images"], sample(unet, 6, steps=3), atol=1e-6)

    # FID in the features of a (tiny) classifier trained on the same data
    cw = tmp_path / "cls.pt"
    assert cli_main(["train", "layermerge:resnet8", "--model-kwargs",
                     '{"in_chans": 1, "width": 4}', "--input-shape", "1,8,8", *data,
                     "--steps", "3", "--batch-size", "32", "--eval-split", "none",
                     "--out", str(cw), *common]) == 0  # fmt: skip
    capsys.readouterr()
    feats = ["--classifier", "layermerge:resnet8", "--classifier-kwargs",
             '{"in_chans": 1, "width": 4}', "--classifier-weights", str(cw)]  # fmt: skip
    cache = tmp_path / "ref.npz"
    fid = ["fid", *model, *data, *feats, "--ref-cache", str(cache), *common]
    assert cli_main([*fid, "--images", str(st)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "classifier features: layermerge:resnet8 trained on mnist" in res["feature_space"]
    assert "not comparable to Inception FID" in res["feature_space"]
    assert res["n"] == 6 and res["n_ref"] == 40 and res["fid"] > 0
    stamp = cache.stat().st_mtime_ns
    assert cli_main([*fid, "--real", "test", "--n", "40"]) == 0
    real = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert real["fid"] < 1e-6  # the reference set against itself
    assert cache.stat().st_mtime_ns == stamp  # the cached statistics were reused
    assert cli_main([*fid, "--weights", str(w), "--n", "6", "--steps", "3"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sampled["fid"] == pytest.approx(res["fid"], rel=1e-4)


def test_importance_command_with_the_diffusion_task(data_dir, tmp_path, capsys):
    from layermerge.train import save_state_dict

    w = save_state_dict(small_unet(), tmp_path / "unet.pt")
    out = tmp_path / "I.csv"
    argv = ["importance", "diffusers:ddpm-small", "--model-kwargs", json.dumps(SMALL_UNET),
            "--weights", str(w), "--data", f"mnist:{data_dir}", "--holdout-per-class", "8",
            "--task", "diffusion", "--optimizer", "adamw", "--lr", "1e-3", "--steps", "2",
            "--limit", "5",
            "--no-conv", "--out", str(out), "--threads", "1", "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    capsys.readouterr()
    import csv

    rows = list(csv.DictReader(out.open()))
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    assert len(rows) == 2 and meta["task"] == "diffusion" and meta["noise_beta_end"] == 0.02
    # scored against the calibrated base: the identity plan's mean under the same protocol
    assert meta["score"] == "loss_ratio" and meta["calibration"]["seeds"] == 3
    base = meta["calibration"]["val_loss"]["mean"]
    for r in rows:
        ratio = (float(r["val_loss"]) - base) / base
        assert float(r["loss_ratio"]) == pytest.approx(ratio, rel=1e-9)
        assert float(r["importance"]) == pytest.approx(math.exp(-ratio), rel=1e-9)


def test_sample_command_with_a_plan_samples_the_merged_network(tmp_path, capsys):
    from layermerge import apply, build_space, conv_weights, merge, trace
    from layermerge.importance import single_block_plan
    from layermerge.train import save_state_dict

    unet = small_unet()
    traced = trace(unet, (1, 8, 8))
    space = build_space(traced.chain, conv_weights(traced))
    plan = single_block_plan(space, max(space.options, key=lambda o: o.end - o.start))
    (tmp_path / "plan.json").write_text(plan.to_json())
    net = apply(traced, plan)
    save_state_dict(net, tmp_path / "net.pt")
    st = tmp_path / "s.safetensors"
    argv = ["sample", "diffusers:ddpm-small", "--model-kwargs", json.dumps(SMALL_UNET),
            "--plan", str(tmp_path / "plan.json"), "--weights", str(tmp_path / "net.pt"),
            "--n", "3", "--steps", "3", "--out", str(tmp_path / "g.png"),
            "--save-tensor", str(st), "--threads", "1", "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    capsys.readouterr()
    want = sample(merge(net), 3, steps=3)
    assert torch.allclose(read_state_dict(st)["images"], want, atol=1e-6)
    assert not torch.allclose(want, sample(unet, 3, steps=3), atol=1e-3)
