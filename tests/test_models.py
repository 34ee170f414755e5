"""Model loading: specs, kwargs, local weights (state dict and safetensors), errors."""

import collections

import pytest
import torch
from safetensors.torch import save_file

from layermerge import ModelLoadError, load_model
from layermerge.cli import main

from .conftest import USER_MODELS


def test_specs_and_default_shapes():
    assert load_model("torchvision:resnet18").input_shape == (3, 224, 224)
    assert load_model("layermerge:resnet20").input_shape == (3, 32, 32)
    assert load_model("layermerge:resnet20", {"in_chans": 1}).input_shape == (1, 32, 32)
    m = load_model("torchvision:mobilenet_v2", '{"width_mult": 1.4}').model
    assert m.features[0][0].out_channels == 48
    user = load_model(f"{USER_MODELS}:plain", {"width": 4}, input_shape="3,8,8")
    assert user.input_shape == (3, 8, 8) and user.model.body[0].out_channels == 4
    assert not load_model("timm:resnet18").model.training


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_weights(tmp_path, fmt):
    src = load_model("layermerge:resnet8").model
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pt":
        torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    else:
        save_file(sd, str(path))
    dst = load_model("layermerge:resnet8", weights=path).model
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize(
    "wrap",
    [
        # a LightningModule holding the network as self.model, with a metric's state
        lambda sd: {
            "state_dict": {
                **{"model." + k: v for k, v in sd.items()},
                "train_acc.total": torch.tensor(3.0),
            },
            "epoch": 2,
        },
        # DeepSpeed: the engine's "module", keys of the DDP-wrapped module
        lambda sd: {"module": {"module." + k: v for k, v in sd.items()}},
        # torch.compile inside DDP
        lambda sd: {"module._orig_mod." + k: v for k, v in sd.items()},
        # a LightningModule whose network is self.net of a wrapper (nested)
        lambda sd: {"state_dict": {"teacher.net." + k: v for k, v in sd.items()}},
    ],
    ids=["lightning", "deepspeed", "compiled-ddp", "nested"],
)
def test_framework_checkpoints_are_unwrapped(tmp_path, wrap):
    src = load_model("layermerge:resnet8", seed=1).model
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    torch.save(wrap(sd), tmp_path / "ckpt.pt")
    dst = load_model("layermerge:resnet8", weights=tmp_path / "ckpt.pt").model
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_timm_models_carry_their_preprocessing():
    loaded = load_model("timm:resnet18")
    pre = loaded.preprocessing
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert pre["interpolation"] and 0 < pre["crop_pct"] <= 1
    assert load_model("layermerge:resnet8").preprocessing is None


def test_weight_errors(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(load_model("layermerge:resnet8").model.state_dict(), path)
    with pytest.raises(ModelLoadError, match="do not fit"):
        load_model("layermerge:resnet14", weights=path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model("layermerge:resnet8", weights=tmp_path / "missing.pt")

    torch.save({"x": collections.OrderedDict, "y": print}, tmp_path / "evil.pt")  # globals
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_model("layermerge:resnet8", weights=tmp_path / "evil.pt")


@pytest.mark.parametrize(
    "spec,kwargs,msg",
    [
        ("resnet18", None, "use torchvision:NAME"),
        ("nope:resnet18", None, "unknown model family"),
        ("torchvision:resnet999", None, "no model"),
        ("layermerge:nope", None, "available"),
        ("timm:nope_net", None, "no model"),
        ("layermerge:resnet8", "[1]", "JSON object"),
        ("layermerge:resnet8", "{bad", "not valid JSON"),
        ("layermerge:resnet8", '{"bogus": 1}', "does not accept"),
        ("missing_file.py:f", None, "does not exist"),
    ],
)
def test_spec_errors(spec, kwargs, msg):
    with pytest.raises(ModelLoadError, match=msg):
        load_model(spec, kwargs)


def test_cli_reports_bad_input_shape(capsys):
    assert main(["inspect", "layermerge:resnet8", "--input-shape", "3,32"]) == 2
    assert "C,H,W" in capsys.readouterr().err


@pytest.mark.parametrize(
    "spec,family,timestep",
    [
        ("layermerge:resnet8", "cnn", False),
        ("torchvision:resnet18", "cnn", False),
        ("timm:resnet18", "cnn", False),
        ("diffusers:ddpm-small", "diffusers-unet", True),
    ],
)
def test_each_loaded_model_has_its_family(spec, family, timestep):
    from layermerge.families import family_for_model

    loaded = load_model(spec)
    f = family_for_model(loaded.model)
    assert (f.name, f.takes_timestep) == (family, timestep)
    assert f.default_input_shape(loaded.model) in (None, loaded.input_shape)
