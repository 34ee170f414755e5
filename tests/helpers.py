"""Shared test helpers (imported by tests, not collected): the tiny models most tests
use, synthetic data sets in their on-disk formats, and exactness checks of plans."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path

import numpy as np
import torch

from layermerge import apply, build_space, conv_weights, count_layers, load_model, merge, trace
from layermerge.data import write_idx
from layermerge.transform import TOLERANCE, compare, randomize_batchnorm

# ---------------------------------------------------------------------------
# tiny models

#: the tiny classifier of the training, importance and distributed tests
MODEL = "layermerge:resnet8"
KW = {"in_chans": 1, "width": 4}
SHAPE = (1, 8, 8)

#: a UNet2DModel small enough to train for a few steps on a CPU (8x8, one channel)
SMALL_UNET = {
    "sample_size": 8,
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
}


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    """``MODEL`` with ``KW``, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return load_model(MODEL, KW).model


def small_unet(seed: int = 0) -> torch.nn.Module:
    """``diffusers:ddpm-small`` with ``SMALL_UNET``, weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return load_model("diffusers:ddpm-small", SMALL_UNET).model


# ---------------------------------------------------------------------------
# synthetic data sets in their on-disk formats


def class_images(labels: np.ndarray, size: int, seed: int = 0, channels: int = 0) -> np.ndarray:
    """Learnable images: class c lights up a class-specific patch, plus noise.
    ``channels`` 0 gives N x H x W, else N x C x H x W."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    shape = (n, size, size) if channels == 0 else (n, channels, size, size)
    x = rng.integers(0, 60, size=shape).astype(np.int64)
    half = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c) % 4, 2)
        x[i, ..., r * half : (r + 1) * half, q * half : (q + 1) * half] += 150
    return np.clip(x, 0, 255).astype(np.uint8)


def write_mnist_like(root: Path, *, n_train=160, n_test=40, size=8, classes=4, gz=True) -> Path:
    """IDX files as in the MNIST / Fashion-MNIST / KMNIST distributions."""
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = np.arange(n) % classes
        np.random.default_rng(seed + 10).shuffle(labels)
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", class_images(labels, size, seed))
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels.astype(np.uint8))
    return root


def _py2_batch(data: np.ndarray, labels: list[int], label_key: bytes) -> dict:
    # The official files are Python 2 pickles: str keys load as bytes.
    return {b"batch_label": b"synthetic", label_key: labels, b"data": data, b"filenames": []}


def write_cifar10(root: Path, per_batch: int = 20, classes: int = 10) -> Path:
    """The CIFAR-10 python batches (``cifar-10-batches-py``)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    for k, name in enumerate(names):
        labels = [int(v) for v in np.arange(per_batch) % classes]
        imgs = class_images(np.array(labels), 32, seed=k, channels=3).reshape(per_batch, -1)
        with open(d / name, "wb") as f:
            pickle.dump(_py2_batch(imgs, labels, b"labels"), f, protocol=2)
    meta = {b"label_names": [f"class{i}".encode() for i in range(classes)], b"num_vis": 3072}
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def write_cifar100(root: Path, n: int = 30) -> Path:
    """The CIFAR-100 python files (``cifar-100-python``)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for k, name in enumerate(("train", "test")):
        labels = [int(v) for v in (np.arange(n) * 7) % 100]
        imgs = class_images(np.array(labels), 32, seed=k, channels=3).reshape(n, -1)
        batch = _py2_batch(imgs, labels, b"fine_labels")
        batch[b"coarse_labels"] = [v // 5 for v in labels]
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f, protocol=2)
    return root


def write_imagefolder(root: Path, per_class: int = 6, size=(20, 14)) -> Path:
    """An ImageFolder tree (``train/`` and ``val/``) of three single-colour classes."""
    from PIL import Image

    colours = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}
    for split, n in (("train", per_class), ("val", 2)):
        for name, rgb in colours.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, rgb).save(d / f"{i}.png")
    return root


# ---------------------------------------------------------------------------
# exactness of plans


def prepare(model, input_shape, dtype=torch.float64, seed=0, **trace_kw):
    model = randomize_batchnorm(model.to(dtype).eval(), seed)
    traced = trace(model, input_shape, **trace_kw)
    return model, traced, build_space(traced.chain, conv_weights(traced))


def expected_counts(model, traced, plan, input_activation=None) -> dict[str, int]:
    """Convs and activations the deploy network of ``plan`` must hold: one conv per
    block (projections inside a block fold into it), activations at block ends only,
    less a dropped conv's activation that repeats the one before it
    (``input_activation``: what the network applies right before the chain's node 0,
    which the chain does not record)."""
    chain = traced.chain
    orig = count_layers(traced.model)
    inner_proj = sum(
        1
        for sk in chain.skips
        if sk.projection and any(b.start <= sk.start and sk.end <= b.end for b in plan.blocks)
    )
    convs = orig["convs"] - chain.length - inner_proj + sum(1 for b in plan.blocks if b.kept_convs)
    chain_acts = sum(1 for n in chain.nodes[1:] if n.activation)
    kept = 0
    previous = input_activation  # the activation the block before ends with
    for b in plan.blocks:
        act = chain.nodes[b.end].activation
        if not (b.activation and (act is not None or (b.length > 1 and chain.activation))):
            previous = None
            continue
        act = act or chain.activation
        owns_add = any(sk.end == b.end and sk.start < b.start for sk in chain.skips)
        # a dropped conv that leaves relu(relu(x)) (or relu6): the deploy omits the repeat
        if not b.kept_convs and not owns_add and act == previous and act in ("relu", "relu6"):
            continue
        kept += 1
        previous = act
    return {"convs": convs, "activations": orig["activations"] - chain_acts + kept}


def check_plan_exact(traced, plan, dtype) -> float:
    """Apply + merge ``plan``; assert exactness and layer counts; return the error."""
    gc.collect()  # GraphModule copies hold reference cycles (see transform.verify)
    train_net = apply(traced, plan)
    deploy = merge(train_net, verify=False)
    err = compare(train_net, deploy)
    assert err["max_rel_err"] <= TOLERANCE[dtype], (plan.to_dict(), err)
    assert count_layers(deploy) == expected_counts(None, traced, plan), plan.to_dict()
    return err["max_rel_err"]
