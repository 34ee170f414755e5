"""Datasets in their on-disk formats (IDX, CIFAR python batches, ImageFolder),
written here as small synthetic files; transforms; holdout splits; batches."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from layermerge import data as D
from layermerge.data import (
    DataError,
    DataSpec,
    UnsafePickleError,
    holdout_indices,
    make_splits,
    open_dataset,
    parse_data_spec,
    read_idx,
    write_idx,
)

from .helpers import (
    write_cifar10,
    write_cifar100,
    write_imagefolder,
    write_mnist_like,
)

# ---------------------------------------------------------------------------
# synthetic data sets (also used by the training and importance tests)


def test_parse_data_spec():
    assert parse_data_spec("fashion-mnist") == DataSpec("fashion-mnist", D.DEFAULT_FASHION_MNIST)
    assert parse_data_spec("cifar10:/x/y") == DataSpec("cifar10", Path("/x/y"))
    assert parse_data_spec("FashionMNIST:/d").kind == "fashion-mnist"
    with pytest.raises(DataError, match="needs a path"):
        parse_data_spec("cifar100")
    with pytest.raises(DataError, match="unknown dataset"):
        parse_data_spec("svhn:/x")


def test_missing_fashion_mnist_says_how_to_install(tmp_path, monkeypatch):
    # The default lives (and is read) in data.formats; D re-exports it.
    monkeypatch.setattr(D.formats, "DEFAULT_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        make_splits("fashion-mnist", (1, 28, 28))
    # An explicit path that lacks the files names what is missing.
    (tmp_path / "empty").mkdir()
    splits = make_splits(f"fashion-mnist:{tmp_path / 'empty'}", (1, 28, 28))
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        splits.split("train")


# ---------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip_and_header(tmp_path, gz):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    raw = gzip.decompress(p.read_bytes()) if gz else p.read_bytes()
    # magic: two zero bytes, 0x08 = unsigned byte, 3 dimensions; sizes big-endian
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == bytes([0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 5])
    np.testing.assert_array_equal(read_idx(p), a)


def test_idx_wider_types_are_big_endian(tmp_path):
    vals = np.array([1, -2, 300000], dtype=">i4")
    p = tmp_path / "ints.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 1]) + (3).to_bytes(4, "big") + vals.tobytes())
    np.testing.assert_array_equal(read_idx(p), [1, -2, 300000])


def test_idx_refuses_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"12345")
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize("kind", ["mnist", "kmnist", "fashion-mnist"])
def test_idx_dataset_splits(tmp_path, kind):
    root = write_mnist_like(tmp_path / "d", gz=kind != "mnist")
    ds = open_dataset(f"{kind}:{root}")
    assert ds.num_classes == 10
    src = ds.source("train")
    assert tuple(src.images.shape) == (160, 1, 8, 8)
    assert src.images.dtype == torch.uint8
    labels = read_idx(root / ("train-labels-idx1-ubyte" + (".gz" if kind != "mnist" else "")))
    np.testing.assert_array_equal(src.labels, labels)
    assert len(ds.source("test")) == 40


def test_idx_torchvision_layout(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw", gz=False)
    assert len(open_dataset(f"mnist:{tmp_path}").source("train")) == 160


def test_grayscale_to_three_channels_padded(tmp_path):
    root = write_mnist_like(tmp_path / "d", size=28, n_train=40, n_test=8)
    splits = make_splits(f"fashion-mnist:{root}", (3, 32, 32), holdout_per_class=2)
    x, y = next(splits.test.batches(8))
    assert x.shape == (8, 3, 32, 32)
    # the three channels are the same image
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    # 28 -> 32 is a zero border of 2 pixels (black, normalised), the image in the middle
    mean, std = 0.2860, 0.3530
    border = torch.tensor((0.0 - mean) / std)
    assert torch.allclose(x[:, :, :2, :], border) and torch.allclose(x[:, :, :, -2:], border)
    raw = read_idx(root / "t10k-images-idx3-ubyte.gz")[:8]
    expect = (torch.from_numpy(raw).float() / 255 - mean) / std
    assert torch.allclose(x[:, 0, 2:30, 2:30], expect, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), read_idx(root / "t10k-labels-idx1-ubyte.gz")[:8])


def test_resize_when_much_larger(tmp_path):
    root = write_mnist_like(tmp_path / "d", size=8, n_train=40, n_test=4)
    splits = make_splits(f"mnist:{root}", (1, 24, 24), holdout_per_class=2)
    x, _ = next(splits.test.batches(4))
    assert x.shape == (4, 1, 24, 24)
    # bilinear upsampling keeps the mean brightness (no black border)
    raw = torch.from_numpy(read_idx(root / "t10k-images-idx3-ubyte.gz")[:4]).float() / 255
    up = x * 0.3081 + 0.1307
    assert torch.allclose(up.mean((1, 2, 3)), raw.mean((1, 2)), atol=0.02)


# ---------------------------------------------------------------------------
# CIFAR


def test_cifar10_batches(tmp_path):
    root = write_cifar10(tmp_path)
    ds = open_dataset(f"cifar10:{root}")
    assert ds.classes == [f"class{i}" for i in range(10)]
    train, test = ds.source("train"), ds.source("test")
    assert tuple(train.images.shape) == (100, 3, 32, 32) and len(test) == 20
    # row-major 3072 values = 1024 red, 1024 green, 1024 blue
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        b2 = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(train.images[20:40].numpy().reshape(20, -1), b2[b"data"])
    np.testing.assert_array_equal(train.labels[20:40], b2[b"labels"])
    splits = make_splits(f"cifar10:{root}", (3, 32, 32), holdout_per_class=4)
    assert len(splits.holdout_train) == len(splits.holdout_val) == 40
    x, _ = next(splits.test.batches(5))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(x * std + mean, test.images[:5].float() / 255, atol=1e-6)


def test_cifar100_batches(tmp_path):
    root = write_cifar100(tmp_path)
    ds = open_dataset(f"cifar100:{root / 'cifar-100-python'}")  # the directory itself works too
    assert ds.num_classes == 100 and ds.classes[3] == "f3"
    np.testing.assert_array_equal(ds.source("test").labels, (np.arange(30) * 7) % 100)


def test_cifar_to_one_channel_model(tmp_path):
    root = write_cifar10(tmp_path)
    splits = make_splits(f"cifar10:{root}", (1, 32, 32), holdout_per_class=2)
    x, _ = next(splits.test.batches(3))
    assert x.shape == (3, 1, 32, 32)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    root = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": []}, f, protocol=2)
    ds = open_dataset(f"cifar10:{root}")
    with pytest.raises(
        UnsafePickleError, match=r"refusing to unpickle the global (posix|os)\.system"
    ):
        ds.source("train")
    assert not marker.exists()


def test_restricted_unpickler_refuses_builtins_eval(tmp_path):
    p = tmp_path / "evil"
    # GLOBAL builtins.eval, then call it: what a hand-written malicious pickle looks like
    p.write_bytes(b"cbuiltins\neval\n(V1+1\ntR.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        D.restricted_load(p)


def test_cifar_wrong_contents(tmp_path):
    root = write_cifar10(tmp_path)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="3072"):
        open_dataset(f"cifar10:{root}").source("test")
    with pytest.raises(DataError, match="no CIFAR python batches"):
        open_dataset(f"cifar10:{tmp_path / 'elsewhere'}")


# ---------------------------------------------------------------------------
# ImageFolder


def test_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path)
    ds = open_dataset(f"imagefolder:{root}")
    assert ds.classes == ["cat", "dog", "eel"]
    splits = make_splits(ds, (3, 16, 16), holdout_per_class=2)
    assert len(splits.train) == 18 and len(splits.test) == 6
    x, y = next(splits.test.batches(6))
    assert x.shape == (6, 3, 16, 16)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    # uniform images stay uniform through resize + crop; values are the normalised colour
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    red = (torch.tensor([200, 30, 30]).view(3, 1, 1) / 255 - mean) / std
    assert torch.allclose(x[0], red.expand(3, 16, 16), atol=1e-5)
    # training batches (random resized crops, flips) are reproducible from the seed
    a = [b[0] for b in splits.train.batches(4, train=True, seed=3, epoch=1)]
    b = [b[0] for b in splits.train.batches(4, train=True, seed=3, epoch=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == 5


def test_imagefolder_needs_train_dir(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="train"):
        open_dataset(f"imagefolder:{tmp_path}")


# ---------------------------------------------------------------------------
# splits and batches


def test_holdout_split_deterministic_disjoint_balanced():
    labels = np.repeat(np.arange(5), 30)
    np.random.default_rng(1).shuffle(labels)
    tr, va = holdout_indices(labels, 7, seed=4)
    tr2, va2 = holdout_indices(labels, 7, seed=4)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not set(tr) & set(va)
    assert np.bincount(labels[tr]).tolist() == [7] * 5
    assert np.bincount(labels[va]).tolist() == [7] * 5
    tr3, _ = holdout_indices(labels, 7, seed=5)
    assert not np.array_equal(tr, tr3)
    with pytest.raises(DataError, match="fewer than the 62"):
        holdout_indices(labels, 31)


def test_splits_come_from_training_split(tmp_path):
    root = write_mnist_like(tmp_path / "d")
    s = make_splits(f"mnist:{root}", (1, 8, 8), holdout_per_class=5, seed=2)
    assert s.holdout_train.source is s.train.source
    assert len(s.holdout_train) == len(s.holdout_val) == 20
    assert s.describe()["holdout_train_size"] == 20
    # the same seed draws the same images in another process-independent way
    again = make_splits(f"mnist:{root}", (1, 8, 8), holdout_per_class=5, seed=2)
    assert np.array_equal(again.holdout_val.indices, s.holdout_val.indices)


def test_batches_deterministic_and_sharded(tmp_path):
    root = write_mnist_like(tmp_path / "d", n_train=37)
    with pytest.raises(DataError, match="fewer than the 10 needed"):
        make_splits(f"mnist:{root}", (1, 8, 8), holdout_per_class=5).split("holdout-val")
    s = make_splits(f"mnist:{root}", (1, 8, 8), holdout_per_class=2)
    split = s.train

    def run(**kw):
        return [(x.clone(), y.clone()) for x, y in split.batches(8, **kw)]

    a, b = run(train=True, seed=1, epoch=2), run(train=True, seed=1, epoch=2)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    c = run(train=True, seed=1, epoch=3)
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    assert len(a) == split.num_batches(8, train=True) == 5
    # training: two ranks see ceil(37 / 2) = 19 samples each, covering everything
    seen = []
    for r in range(2):
        got = run(train=True, seed=1, epoch=0, rank=r, world=2)
        assert sum(len(y) for _, y in got) == 19
        assert len(got) == split.num_batches(8, train=True, rank=r, world=2)
        seen.append(torch.cat([y for _, y in got]))
    # evaluation: every sample on exactly one rank, in order
    ev = [torch.cat([y for _, y in run(rank=r, world=2)]) for r in range(2)]
    assert len(ev[0]) + len(ev[1]) == 37
    full = torch.cat([y for _, y in run()])
    assert torch.equal(full[0::2], ev[0]) and torch.equal(full[1::2], ev[1])


def test_augmentation_shifts_and_flips_only(tmp_path):
    root = write_mnist_like(tmp_path / "d", n_train=40)
    s = make_splits(f"fashion-mnist:{root}", (1, 8, 8), holdout_per_class=2)
    x_eval = torch.cat([x for x, _ in s.train.batches(40, train=False)])
    x_aug = torch.cat([x for x, _ in s.train.batches(40, train=True, seed=0)])
    assert not torch.equal(x_aug, x_eval)
    assert x_aug.shape == x_eval.shape
    # augmentation moves pixels and pads with black, it never invents brightness
    assert x_aug.max() <= x_eval.max() + 1e-6
