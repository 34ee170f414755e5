"""Load a model from a string: ``torchvision:NAME``, ``timm:NAME``, ``layermerge:NAME``,
``diffusers:NAME`` (a built-in ``UNet2DModel`` configuration, or a local diffusers
directory) or ``path/to/file.py:factory``, with constructor kwargs and local weights.

Nothing is downloaded: pretrained weights come from a local state dict
(``torch.load(weights_only=True)``) or a ``.safetensors`` file. The model is
built under a fixed seed (0 unless told otherwise), so a model without weights
is the same network on every run: its search space, latency table and plans
agree from run to run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ModelLoadError(ValueError):
    """A model spec, its kwargs or its weights could not be used."""


class WeightsError(ModelLoadError):
    """A weights file exists but cannot be used: unreadable, corrupt, not a state
    dict, or tensors that do not fit the model."""


@dataclass
class LoadedModel:
    model: nn.Module
    spec: str
    input_shape: tuple[int, ...]
    # The seed the initialisation was drawn with when no weights were loaded (the
    # weights replace it otherwise); None when the initialisation was not seeded.
    init_seed: int | None = None
    # the model's own preprocessing (timm: its pretrained_cfg): mean, std,
    # interpolation, crop_pct; None when the model says nothing
    preprocessing: dict[str, Any] | None = None


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(","))
    except ValueError:
        raise ModelLoadError(
            f"--input-shape {text!r} must look like C,H,W (e.g. 3,224,224)"
        ) from None
    if len(shape) != 3 or min(shape) < 1:
        raise ModelLoadError(f"--input-shape {text!r} must be three positive ints C,H,W")
    return shape


def parse_kwargs(text: str | dict | None) -> dict[str, Any]:
    if text is None:
        return {}
    if isinstance(text, dict):
        return text
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"--model-kwargs is not valid JSON ({e}): {text!r}") from None
    if not isinstance(kw, dict):
        raise ModelLoadError("--model-kwargs must be a JSON object, e.g. '{\"width_mult\": 1.4}'")
    return kw


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Draw from torch's CPU generator seeded with ``seed`` inside, and leave the
    generator's state outside as it was (``None``: no seeding)."""
    if seed is None:
        yield
        return
    state = torch.random.get_rng_state()
    torch.random.default_generator.manual_seed(int(seed))
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def load_model(
    spec: str,
    model_kwargs: dict[str, Any] | str | None = None,
    weights: str | Path | None = None,
    input_shape: tuple[int, ...] | str | None = None,
    *,
    seed: int | None = 0,
) -> LoadedModel:
    """Build the model named by ``spec`` (in eval mode), load ``weights`` if given.

    The model is built with torch's generator seeded with ``seed`` (the caller's
    random state is left as it was), so without weights two loads give the same
    initial weights, and what is chosen on them (the kept convs of the search
    space's options) is the same run to run. ``seed=None`` draws from the
    current random state instead. Kept convs are meant to be chosen on trained
    weights: without them the choice is reproducible but arbitrary.
    """
    with seeded(seed):
        loaded = _load_model(spec, model_kwargs, weights, input_shape)
    if weights is None and seed is not None:
        loaded.init_seed = int(seed)
    return loaded


def _load_model(
    spec: str,
    model_kwargs: dict[str, Any] | str | None,
    weights: str | Path | None,
    input_shape: tuple[int, ...] | str | None,
) -> LoadedModel:
    kw = parse_kwargs(model_kwargs)
    if isinstance(input_shape, str):
        input_shape = parse_input_shape(input_shape)
    family, sep, name = spec.partition(":")
    if not sep or not name:
        raise ModelLoadError(
            f"model {spec!r}: use torchvision:NAME, timm:NAME, layermerge:NAME, "
            "diffusers:NAME|DIR or path/to/file.py:factory"
        )
    default_shape: tuple[int, ...] = (3, 224, 224)
    preprocessing: dict[str, Any] | None = None
    try:
        if family == "torchvision":
            import torchvision

            try:
                model = torchvision.models.get_model(name, weights=None, **kw)
            except ValueError as e:
                raise ModelLoadError(f"torchvision has no model {name!r} ({e})") from None
            if "inception" in name:
                default_shape = (3, 299, 299)
        elif family == "timm":
            import timm

            if not timm.is_model(name):
                raise ModelLoadError(f"timm has no model {name!r} (see timm.list_models())")
            model = timm.create_model(name, pretrained=False, **kw)
            cfg = getattr(model, "pretrained_cfg", None) or {}
            default_shape = tuple(cfg.get("input_size", default_shape))
            preprocessing = {
                k: (list(cfg[k]) if isinstance(cfg[k], tuple | list) else cfg[k])
                for k in ("mean", "std", "interpolation", "crop_pct")
                if cfg.get(k) is not None
            } or None
        elif family == "layermerge":
            from .zoo import REGISTRY

            if name not in REGISTRY:
                raise ModelLoadError(
                    f"no built-in model {name!r}; available: {', '.join(sorted(REGISTRY))}"
                )
            factory, default_shape = REGISTRY[name]
            model = factory(**kw)
            if "in_chans" in kw:
                default_shape = (int(kw["in_chans"]), *default_shape[1:])
        elif family == "diffusers":
            model = _diffusers_unet(name, kw)
            default_shape = (
                int(model.config.in_channels),
                int(model.config.sample_size),
                int(model.config.sample_size),
            )
        elif spec.rsplit(":", 1)[0].endswith(".py"):
            path_text, factory_name = spec.rsplit(":", 1)
            model = _from_file(Path(path_text), factory_name, kw)
            default_shape = tuple(getattr(model, "input_shape", default_shape))
        else:
            raise ModelLoadError(
                f"unknown model family {family!r} in {spec!r}: use torchvision:, timm:, "
                "layermerge:, diffusers: or a path/to/file.py:factory"
            )
    except TypeError as e:
        raise ModelLoadError(f"model {spec!r} does not accept kwargs {kw}: {e}") from None
    if weights is not None:
        load_weights(model, weights)
    model.eval()
    return LoadedModel(
        model=model,
        spec=spec,
        input_shape=tuple(input_shape or default_shape),
        preprocessing=preprocessing,
    )


#: ``UNet2DModel`` configurations known by name (``diffusers:NAME``)
DIFFUSERS_CONFIGS: dict[str, dict[str, Any]] = {
    # DDPM on CIFAR-10 (Ho et al. 2020) as published in diffusers form: 35.7 M
    # parameters, attention at 16x16
    "ddpm-cifar10": {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 256, 256),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "attention_head_dim": None,
    },
    # the same design at a size that trains on a CPU (Fashion-MNIST example)
    "ddpm-small": {
        "sample_size": 32,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "norm_eps": 1e-6,
        "norm_num_groups": 16,
        "act_fn": "silu",
        "attention_head_dim": None,
    },
}
# ddpm-small narrower (0.93 M parameters, about half the CPU time per step): a
# Fashion-MNIST DDPM that gives recognisable samples in under an hour of one core
DIFFUSERS_CONFIGS["ddpm-fmnist"] = {
    **DIFFUSERS_CONFIGS["ddpm-small"],
    "block_out_channels": (16, 32, 64),
    "norm_num_groups": 8,
}


def _diffusers_unet(name: str, kw: dict[str, Any]) -> nn.Module:
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ModelLoadError(
            "diffusers models need the diffusers package: pip install 'layermerge[diffusion]'"
        ) from None
    if name in DIFFUSERS_CONFIGS:
        cfg = dict(DIFFUSERS_CONFIGS[name])
        if "in_channels" in kw and "out_channels" not in kw:
            kw = {**kw, "out_channels": kw["in_channels"]}
        cfg.update(kw)
        return UNet2DModel(**cfg)
    path = Path(name)
    if path.is_dir():
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        if sub is None and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} holds no config.json (nor unet/config.json): not a diffusers model "
                "directory"
            )
        try:
            model = UNet2DModel.from_pretrained(str(path), subfolder=sub, local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"cannot load a UNet2DModel from {path}: {e}") from None
        if kw:
            raise ModelLoadError("--model-kwargs do not apply to a model loaded from a directory")
        return model
    raise ModelLoadError(
        f"diffusers:{name}: not a built-in configuration ({', '.join(sorted(DIFFUSERS_CONFIGS))}) "
        "nor a local diffusers directory"
    )


def _from_file(path: Path, factory: str, kw: dict[str, Any]) -> nn.Module:
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    mod_name = f"layermerge_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if fn is None:
        raise ModelLoadError(f"{path} defines no {factory!r}")
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{path}:{factory} returned {type(model).__name__}, not nn.Module")
    return model


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _load_reason(e: BaseException) -> str:
    """The informative line of a torch.load failure (its first line is boilerplate
    about the weights_only default when the unpickler refused something)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    boilerplate = ("Weights only load failed", "Check the documentation")
    for ln in lines:
        if ln.startswith(boilerplate):
            continue
        rest = ln.partition("WeightsUnpickler error:")
        text = rest[2].strip() if rest[1] else ln
        if text:
            return f"the unpickler refused it: {text}"
    return lines[0] if lines else type(e).__name__


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file, read without
    unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"weights file {path} does not exist")
    if not path.is_file():
        raise ModelLoadError(f"weights {path} is not a file: give a .pt/.pth or .safetensors file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol of the file
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise WeightsError(f"cannot read weights {path}: {e.strerror or e}") from None
    except Exception as e:
        raise WeightsError(
            f"cannot read {path} as a state dict with torch.load(weights_only=True) "
            f"({_load_reason(e)}): the file is truncated, corrupt or holds objects other "
            "than tensors; save it with torch.save(model.state_dict()) or as .safetensors"
        ) from None
    # Lightning ("state_dict"), DeepSpeed ("module"), common training scripts
    for key in ("state_dict", "model", "model_state_dict", "module", "ema"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{path} is not a state dict of tensors: entry {str(bad[0])!r} holds "
            f"{type(sd[bad[0]]).__name__}"
        )
    return dict(sd)


def unwrap_prefixes(sd: dict[str, torch.Tensor], own: Iterable[str]) -> dict[str, torch.Tensor]:
    """``sd`` with the wrapper prefixes that training frameworks add removed, as long
    as removing one makes more of its keys the model's own (``own``): DDP and
    DeepSpeed's ``module.``, ``torch.compile``'s ``_orig_mod.``, a LightningModule's
    attribute (``model.``, ``net.``, any name), possibly nested."""
    own = set(own)
    while sd:
        hits = sum(k in own for k in sd)
        heads = {k.split(".", 1)[0] for k in sd if "." in k}
        best, best_hits = None, hits
        for head in heads:
            prefix = head + "."
            stripped = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
            n = sum(k in own for k in stripped)
            if n > best_hits:
                best, best_hits = prefix, n
        if best is None and len(heads) == 1 and all("." in k for k in sd):
            # one wrapper around every key that is not the model's own (e.g. DDP's
            # "module." around torch.compile's "_orig_mod."): peel it and look again
            (head,) = heads
            if not any(k.startswith(head + ".") for k in own):
                best = head + "."
        if best is None:
            return sd
        # keys outside the wrapper (e.g. a Lightning metric's state) are not the model's
        sd = {k.removeprefix(best): v for k, v in sd.items() if k.startswith(best)}
    return sd


#: the largest safetensors header read (the format's own limit is 100 MB)
_SAFETENSORS_MAX_HEADER = 100_000_000


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Check the safetensors header (its size, JSON, and that the data it describes is
    in the file) before handing the file to the safetensors reader."""
    import struct

    from safetensors.torch import load_file

    size = path.stat().st_size
    advice = "the file is truncated or not a safetensors file; save it again"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            raw = f.read(n) if n is not None and n <= min(_SAFETENSORS_MAX_HEADER, size) else None
    except OSError as e:
        raise WeightsError(f"cannot read weights {path}: {e.strerror or e}") from None
    if n is None:
        raise WeightsError(f"{path}: {size} bytes, too short for safetensors: {advice}")
    if raw is None or n > size - 8:
        raise WeightsError(
            f"{path}: safetensors header of {n} bytes in a file of {size} bytes: {advice}"
        )
    try:
        header = json.loads(raw)
    except ValueError:
        raise WeightsError(f"{path}: the safetensors header is not valid JSON: {advice}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: the safetensors header is not a JSON object: {advice}")
    ends = [
        v.get("data_offsets", [0, 0])[1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict)
    ]
    if ends and max(ends) > size - 8 - n:
        raise WeightsError(
            f"{path}: the header describes {max(ends)} bytes of tensors, the file holds "
            f"{size - 8 - n}: {advice}"
        )
    try:
        return load_file(str(path))
    except Exception as e:
        raise WeightsError(
            f"cannot read {path} as safetensors ({_first_line(e)}): {advice}"
        ) from None


def load_weights(model: nn.Module, path: str | Path) -> None:
    own = model.state_dict()
    sd = unwrap_prefixes(read_state_dict(path), own)
    wrong = [
        f"{k} is {'x'.join(map(str, v.shape)) or 'a scalar'} in the file, "
        f"{'x'.join(map(str, own[k].shape)) or 'a scalar'} in the model"
        for k, v in sd.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise WeightsError(
            f"weights {path} do not fit the model: {'; '.join(wrong[:3])}"
            f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}; were they saved "
            "from this model with the same --model-kwargs?"
        )
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"weights {path} do not fit the model: missing {result.missing_keys[:5]}"
            f"{'...' if len(result.missing_keys) > 5 else ''}, unexpected "
            f"{result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )
