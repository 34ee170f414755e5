"""Export of merged networks and loading them back."""

import json

import pytest
import torch

from layermerge import apply, build_space, conv_weights, load_model, merge, trace
from layermerge.cli import main
from layermerge.export import EXPORT_TOLERANCE, export, load_compressed, run_export
from layermerge.transform import compare, randomize_batchnorm


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    model = randomize_batchnorm(load_model("layermerge:resnet8").model)
    traced = trace(model, (3, 16, 16))
    space = build_space(traced.chain, conv_weights(traced))
    plan = space.deepest_plan()
    return traced, plan, merge(apply(traced, plan))


@pytest.mark.parametrize("fmt", ["onnx", "pt2", "torchscript"])
def test_exports_match_pytorch(tmp_path, compressed, fmt):
    _, _, deploy = compressed
    r = export(deploy, fmt, tmp_path / f"m.{fmt}", (3, 16, 16))
    assert r["max_rel_err"] <= EXPORT_TOLERANCE
    # dynamic batch: a batch size the export never saw
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        ref = deploy(x)
        got = run_export(fmt, r["path"], x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= EXPORT_TOLERANCE * ref.abs().max()


def test_load_back_from_model_plan_and_train_weights(tmp_path, compressed):
    traced, plan, _ = compressed
    plan_path = plan.save(tmp_path / "plan.json")
    # a "fine-tuned" train-time network: perturb its weights, save its state dict
    train_net = apply(traced, plan)
    with torch.no_grad():
        for p in train_net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(train_net.state_dict(), tmp_path / "ft.pt")
    deploy = load_compressed(traced, plan_path, tmp_path / "ft.pt")
    err = compare(train_net.eval(), deploy)
    assert err["max_rel_err"] <= 1e-4
    # without the train-time weights it is the merged original, which differs
    assert compare(train_net, load_compressed(traced, plan_path))["max_rel_err"] > 1e-3


def test_export_cli(tmp_path, compressed, capsys):
    traced, plan, _ = compressed
    plan.save(tmp_path / "plan.json")
    rc = main(
        [
            "export",
            "layermerge:resnet8",
            "--input-shape",
            "3,16,16",
            "--plan",
            str(tmp_path / "plan.json"),
            "--out-dir",
            str(tmp_path / "out"),
            "--format",
            "onnx",
            "--format",
            "torchscript",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["format"] for r in out["exports"]] == ["onnx", "torchscript"]
    assert (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "model.ts").exists()
    assert all(r["max_rel_err"] <= EXPORT_TOLERANCE for r in out["exports"])


def test_wrong_train_weights_are_refused(tmp_path, compressed):
    traced, plan, _ = compressed
    torch.save({"nope": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="do not fit"):
        load_compressed(traced, plan, tmp_path / "bad.pt")


def test_unet_export_takes_the_timestep(tmp_path, capsys):
    """`layermerge export diffusers:...` (with and without --plan) writes an ONNX
    file of two inputs, sample and timestep; ONNX Runtime matches PyTorch at two
    different timesteps, and the file drops into a diffusers pipeline."""
    from layermerge.export import load_onnx, onnx_module, run_onnx
    from layermerge.families.diffusers_unet import PipelineUNet, UNetExport

    from .helpers import SMALL_UNET, small_unet

    unet = small_unet(seed=3)
    traced = trace(unet, (1, 8, 8))
    plan = build_space(traced.chain).random_plan(1)
    plan.save(tmp_path / "plan.json")
    kwargs = json.dumps(SMALL_UNET)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    for plan_args, out in (([], "identity"), (["--plan", str(tmp_path / "plan.json")], "plan")):
        rc = main(
            [
                "export",
                "diffusers:ddpm-small",
                "--model-kwargs",
                kwargs,
                "--weights",
                str(tmp_path / "unet.pt"),
            ]
            + plan_args
            + ["--format", "onnx", "--out-dir", str(tmp_path / out), "--json"]
        )
        res = json.loads(capsys.readouterr().out)
        assert rc == 0, res
        assert res["exports"][0]["inputs"] == [[1, 8, 8], []]
    session = load_onnx(tmp_path / "plan" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep"]
    net = UNetExport(load_compressed(trace(small_unet(seed=3), (1, 8, 8)), plan)).eval()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    outs = []
    for t in (10, 900):
        ts = torch.full((2,), t, dtype=torch.long)
        with torch.no_grad():
            ref = net(x, ts)
        got = run_onnx(session, x, ts)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # the timestep reaches the network

    from diffusers import DDIMPipeline, DDIMScheduler

    shipped = PipelineUNet(onnx_module(tmp_path / "plan" / "model.onnx"), unet.config)
    pipe = DDIMPipeline(unet=shipped, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
