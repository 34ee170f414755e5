"""Training: the loop learns, the schedule is what it says, checkpoints resume
exactly, distillation, weight files, and the train / finetune / evaluate commands."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from layermerge import apply, build_space, conv_weights, load_model, trace
from layermerge.cli import main as cli_main
from layermerge.models import ModelLoadError, read_state_dict
from layermerge.tasks import ClassificationTask
from layermerge.train import (
    Recipe,
    TrainingError,
    evaluate,
    fit,
    importance_recipe,
    load_train_net,
    save_state_dict,
)

from .helpers import KW, MODEL, SHAPE, tiny_resnet, write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_mnist_like(tmp_path_factory.mktemp("mnist"), n_train=200, n_test=60)


@pytest.fixture
def splits(mnist_dir):
    return ClassificationTask().make_data(f"mnist:{mnist_dir}", SHAPE, holdout_per_class=8)


def test_training_reduces_loss(splits):
    task = ClassificationTask()
    model = tiny_resnet()
    before = evaluate(model, task, splits.test)
    res = fit(model, task, splits.train, Recipe(epochs=3, batch_size=32, lr=0.05), progress=False)
    after = evaluate(model, task, splits.test)
    assert res.steps == 3 * 7  # 200 samples / 32 -> 7 batches per epoch
    assert after["loss"] < 0.6 * before["loss"]
    assert after["accuracy"] >= 80.0  # four classes, chance is 25%
    assert res.history[0]["train_loss"] > res.history[-1]["train_loss"]


def test_cosine_schedule_with_warmup():
    r = Recipe(lr=0.4, warmup_epochs=1, min_lr=0.0)
    # 4 steps per epoch, 12 steps: 4 warm-up steps up to the peak, then cosine over 8
    lrs = [r.lr_at(s, 12, 4) for s in range(12)]
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4)
    assert lrs[8] == pytest.approx(0.2)  # half-way through the cosine
    assert lrs[11] == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    imp = importance_recipe()
    assert (imp.lr, imp.momentum, imp.nesterov, imp.weight_decay, imp.batch_size) == (
        0.1,
        0.9,
        True,
        1e-5,
        256,
    )
    assert imp.lr_at(0, 2, 2) == 0.1 and imp.lr_at(1, 2, 2) == pytest.approx(0.05)
    assert Recipe(epochs=0.5).total_steps(10) == 5 and Recipe(steps=3).total_steps(10) == 3
    with pytest.raises(ValueError):
        Recipe(optimizer="lbfgs")


class _StopAfterFirstEpoch(Exception):
    pass


def _stop(record):
    if record["epoch"] == 1:
        raise _StopAfterFirstEpoch


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_checkpoint_resume_continues_exactly(splits, tmp_path, optimizer):
    task = ClassificationTask(label_smoothing=0.1)
    recipe = Recipe(
        epochs=2, batch_size=48, lr=0.05, optimizer=optimizer, warmup_epochs=0.5, grad_clip=5.0
    )
    straight = tiny_resnet()
    fit(straight, task, splits.train, recipe, checkpoint=tmp_path / "a.ckpt", progress=False)

    interrupted = tiny_resnet()
    with pytest.raises(_StopAfterFirstEpoch):
        fit(
            interrupted,
            task,
            splits.train,
            recipe,
            checkpoint=tmp_path / "b.ckpt",
            progress=False,
            on_epoch_end=_stop,
        )
    # other initial weights: everything must come from the checkpoint
    resumed = tiny_resnet(seed=123)
    res = fit(resumed, task, splits.train, recipe, checkpoint=tmp_path / "b.ckpt", progress=False)
    assert res.resumed_from_epoch == 1 and res.steps == 10
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished checkpoint resumes to nothing more
    again = tiny_resnet(seed=5)
    res2 = fit(again, task, splits.train, recipe, checkpoint=tmp_path / "a.ckpt", progress=False)
    assert res2.resumed_from_epoch == 2 and len(res2.history) == 2
    assert all(torch.equal(a[k], again.state_dict()[k]) for k in a)


def test_resume_refuses_other_recipe(splits, tmp_path):
    task = ClassificationTask()
    fit(
        tiny_resnet(), task, splits.train, Recipe(steps=2, batch_size=64), checkpoint=tmp_path / "c"
    )
    with pytest.raises(TrainingError, match=r"lr=0.1 \(now 0.2\)"):
        fit(
            tiny_resnet(),
            task,
            splits.train,
            Recipe(steps=2, batch_size=64, lr=0.2),
            checkpoint=tmp_path / "c",
        )
    # unless asked not to resume
    fit(
        tiny_resnet(),
        task,
        splits.train,
        Recipe(steps=2, batch_size=64, lr=0.2),
        checkpoint=tmp_path / "c",
        resume=False,
    )


def test_distillation_loss():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    ce = torch.nn.functional.cross_entropy(net(x), y)
    teacher = copy.deepcopy(net)
    # a teacher equal to the student adds nothing: KL(p || p) = 0
    half = ClassificationTask(distill_weight=0.5).training_loss(net, (x, y), teacher=teacher)
    assert half.item() == pytest.approx(0.5 * ce.item(), abs=1e-6)
    # against another teacher the term is T^2 * KL(teacher || student), batch mean
    other = torch.nn.Linear(5, 3)
    T = 2.0
    pt = torch.softmax(other(x) / T, 1)
    kl = (pt * (pt.log() - torch.log_softmax(net(x) / T, 1))).sum(1).mean()
    full = ClassificationTask(distill_weight=1.0, distill_temperature=T)
    assert full.training_loss(net, (x, y), teacher=other).item() == pytest.approx(
        T * T * kl.item(), rel=1e-5
    )
    # no teacher: plain cross-entropy whatever the weight
    assert full.training_loss(net, (x, y)).item() == pytest.approx(ce.item())


def test_classification_importance_values():
    task = ClassificationTask()
    base = {"train": {"accuracy": 90.0, "loss": 0.3}, "val": {"accuracy": 80.0, "loss": 0.5}}
    got = task.importance_values(
        base, {"train": {"accuracy": 85.0, "loss": 0.4}, "val": {"accuracy": 70.0, "loss": 0.9}}
    )
    assert got["delta_acc"] == pytest.approx(-10.0)
    assert got["importance"] == pytest.approx(math.exp(-0.1))
    assert got["delta_loss"] == pytest.approx(0.4)
    assert set(task.importance_columns) <= set(got)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_files(tmp_path, suffix):
    model = tiny_resnet()
    p = save_state_dict(model, tmp_path / f"w{suffix}")
    sd = read_state_dict(p)
    ref = model.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


def test_train_time_network_round_trip(tmp_path):
    loaded = load_model(MODEL, KW, None, SHAPE)
    traced = trace(loaded.model, SHAPE)
    space = build_space(traced.chain, conv_weights(traced))
    plan = space.deepest_plan()
    net = apply(traced, plan)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_state_dict(net, tmp_path / "ft.pt")
    back = load_train_net(traced, plan, tmp_path / "ft.pt")
    x = torch.randn(2, *SHAPE)
    net.eval()
    assert torch.equal(net(x), back(x))
    with pytest.raises(ModelLoadError, match="do not fit the train-time network"):
        load_train_net(traced, space.identity_plan(), tmp_path / "ft.pt")


# ---------------------------------------------------------------------------
# commands


def run(capsys, argv):
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _model_args(mnist_dir):
    return [
        MODEL,
        "--model-kwargs",
        json.dumps(KW),
        "--input-shape",
        ",".join(map(str, SHAPE)),
        "--data",
        f"mnist:{mnist_dir}",
        "--no-progress",
    ]


def test_train_finetune_evaluate_commands(mnist_dir, tmp_path, capsys):
    common = _model_args(mnist_dir)
    base = tmp_path / "base.pt"
    rc, out, _ = run(
        capsys,
        ["train", *common, "--epochs", "2", "--batch-size", "32", "--lr", "0.05"]
        + ["--out", str(base), "--json"],
    )
    trained = json.loads(out)
    assert rc == 0 and base.exists() and trained["epoch"] == 2 and trained["steps"] == 14
    rc, out, _ = run(capsys, ["evaluate", *common, "--weights", str(base), "--json"])
    ev = json.loads(out)
    assert ev["accuracy"] == pytest.approx(trained["test_accuracy"])
    assert ev["loss"] == pytest.approx(trained["test_loss"])

    loaded = load_model(MODEL, KW, base, SHAPE)
    traced = trace(loaded.model, SHAPE)
    plan = build_space(traced.chain, conv_weights(traced)).deepest_plan()
    plan.save(tmp_path / "plan.json")
    ft = tmp_path / "ft.pt"
    rc, out, _ = run(
        capsys,
        ["finetune", *common, "--weights", str(base), "--plan", str(tmp_path / "plan.json")]
        + ["--steps", "6", "--batch-size", "32", "--lr", "0.02", "--distill", "0.5"]
        + ["--eval-before", "--out", str(ft), "--json"],
    )
    tuned = json.loads(out)
    assert rc == 0 and ft.exists()
    assert tuned["base_accuracy"] == pytest.approx(ev["accuracy"])
    rc, out, _ = run(
        capsys,
        ["evaluate", *common, "--weights", str(ft), "--plan", str(tmp_path / "plan.json")]
        + ["--json"],
    )
    merged = json.loads(out)
    assert rc == 0
    assert merged["accuracy"] == pytest.approx(tuned["merged_accuracy"])
    assert merged["loss"] == pytest.approx(tuned["merged_loss"], rel=1e-4)
    # human output: one line per metric
    rc, out, _ = run(capsys, ["evaluate", *common, "--weights", str(base)])
    assert out.splitlines()[0].startswith("loss ") and out.splitlines()[1].startswith("accuracy ")


def test_command_errors_are_one_line(mnist_dir, tmp_path, capsys):
    common = _model_args(mnist_dir)
    rc, _, err = run(
        capsys,
        ["train", *common[:-3], "--data", f"cifar10:{tmp_path}", "--steps", "1"]
        + ["--out", str(tmp_path / "w.pt")],
    )
    assert rc == 2 and err.count("\n") == 1 and "no CIFAR python batches" in err
    (tmp_path / "p.json").write_text("{}")  # a missing --plan would be refused first
    rc, _, err = run(
        capsys,
        ["finetune", *common, "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")],
    )
    assert rc == 2 and "needs the trained network's --weights" in err
