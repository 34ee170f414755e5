"""Hostile input through the command line: every fault is refused cleanly.

Each case drives ``layermerge.cli.main`` in-process and asserts a clean refusal:
the exit status (2: the command line is wrong, 1: the work failed), one line on
stderr naming the culprit, no traceback, and no file left behind by a failed
write. Tests run as root here, so read-only and full disks are simulated by
making the write raise ``OSError`` (ENOSPC, EROFS) in-process, and unwritable
paths by putting a file where a directory should be.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from layermerge.cli import error_of, main
from layermerge.data import write_idx
from layermerge.models import load_model

from .helpers import write_cifar10, write_imagefolder, write_mnist_like

pytestmark = pytest.mark.usefixtures("one_thread")

KW = {"in_chans": 1, "num_classes": 4}
MODEL = ["layermerge:resnet8", "--model-kwargs", json.dumps(KW), "--input-shape", "1,8,8"]


def refused(capsys, argv, code, *names):
    """Run the CLI; assert exit ``code``, one stderr line naming ``names``, no traceback."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == code, (rc, err)
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith(f"layermerge {argv[0]}: error: "), err
    for n in names:
        assert str(n) in err, (n, err)
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A dataset, good weights and a collection of bad files."""
    d = tmp_path_factory.mktemp("hostile")
    mnist = write_mnist_like(d / "mnist", n_train=40, n_test=8, classes=4)
    model = load_model("layermerge:resnet8", KW).model
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, d / "good.pt")
    from safetensors.torch import save_file

    save_file(sd, str(d / "good.safetensors"))
    raw = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.safetensors").write_bytes(bytes(range(256)) * 4)
    (d / "huge_header.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    (d / "empty.safetensors").write_bytes(b"")
    wrong = dict(sd, **{"conv1.weight": torch.zeros(16, 3, 3, 3)})
    torch.save(wrong, d / "wrong_shapes.pt")
    save_file(wrong, str(d / "wrong_shapes.safetensors"))
    torch.save([1, 2, 3], d / "a_list.pt")
    (d / "garbage.pt").write_bytes(b"\x80\x02garbage" * 10)
    marker = d / "pwned"
    with open(d / "malicious.pt", "wb") as f:
        pickle.dump({"conv1.weight": _Payload(str(marker))}, f, protocol=2)
    return {"dir": d, "mnist": mnist, "marker": marker}


class _Payload:
    """Unpickling this would create a directory (a stand-in for any code)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# ---------------------------------------------------------------------- bad flags


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["benchmark", *MODEL, "--rounds", "0"], "--rounds"),
        (["benchmark", *MODEL, "--calls", "0"], "--calls"),
        (["benchmark", *MODEL, "--max-time", "-1"], "--max-time"),
        (["evaluate", *MODEL, "--batch-size", "0"], "--batch-size"),
        (["latency", *MODEL, "--out", "t.csv", "--max-entries", "-1"], "--max-entries"),
        (["latency", *MODEL, "--out", "t.csv", "--min-runs", "0"], "--min-runs"),
        (["latency", *MODEL, "--out", "t.csv", "--rel-tol", "nan"], "--rel-tol"),
        (["verify", *MODEL, "--plans", "-1"], "--plans"),
        (["importance", *MODEL, "--out", "i.csv", "--threads", "0"], "--threads"),
        (["importance", *MODEL, "--out", "i.csv", "--limit", "-1"], "--limit"),
        (["train", *MODEL, "--out", "w.pt", "--steps", "0"], "--steps"),
        (["train", *MODEL, "--out", "w.pt", "--lr", "-0.1"], "--lr"),
        (["train", *MODEL, "--out", "w.pt", "--workers", "-2"], "--workers"),
        (["sample", *MODEL, "--out", "g.png", "--n", "0"], "--n"),
        (["inspect", *MODEL, "--init-seed", "x"], "--init-seed"),
        (["inspect", *MODEL, "--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flag_values_are_refused_before_any_work(argv, flag, capsys):
    refused(capsys, argv, 2, flag)


@pytest.mark.parametrize(
    "argv, culprit",
    [
        (["inspect", "layermerge:resnet8", "--input-shape", "3,32"], "3,32"),
        (["inspect", "layermerge:resnet8", "--model-kwargs", "{oops"], "--model-kwargs"),
        (["inspect", "layermerge:nope"], "nope"),
        (["inspect", "layermerge:resnet8", "--freeze", "layer1"], "layer1 is a Sequential"),
        (["inspect", "layermerge:resnet8", "--freeze", "bn1"], "bn1 is a BatchNorm2d"),
        (["inspect", "layermerge:resnet8", "--freeze", "no.such"], "no.such"),
    ],
)
def test_bad_model_arguments(argv, culprit, capsys):
    refused(capsys, argv, 2, culprit)


# ----------------------------------------------------------------- corrupt weights


@pytest.mark.parametrize(
    "name, says",
    [
        ("truncated.safetensors", "truncated"),
        ("garbage.safetensors", "not a safetensors file"),
        ("huge_header.safetensors", "header of 1000000000000 bytes"),
        ("empty.safetensors", "too short"),
        ("wrong_shapes.pt", "conv1.weight is 16x3x3x3 in the file, 16x1x3x3 in the model"),
        ("wrong_shapes.safetensors", "conv1.weight is 16x3x3x3 in the file"),
        ("a_list.pt", "does not hold a state dict"),
        ("garbage.pt", "torch.load(weights_only=True)"),
        ("malicious.pt", "unpickler refused it"),
    ],
)
def test_corrupt_weights_are_refused(files, name, says, capsys):
    path = files["dir"] / name
    refused(capsys, ["inspect", *MODEL, "--weights", path], 1, path, says)
    assert not files["marker"].exists()  # nothing of the malicious pickle ran


def test_missing_weights_are_a_usage_error(files, capsys):
    refused(capsys, ["inspect", *MODEL, "--weights", files["dir"] / "nope.pt"], 2, "nope.pt")
    refused(capsys, ["inspect", *MODEL, "--weights", files["dir"]], 2, "is not a file")


def test_good_weights_still_load(files, capsys):
    for name in ("good.pt", "good.safetensors"):
        assert main(["inspect", *MODEL, "--weights", str(files["dir"] / name), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["input_shape"] == [1, 8, 8]


# ----------------------------------------------------------- shapes and allocation


def test_input_shape_of_the_wrong_channels_says_so_without_a_traceback(capsys):
    err = refused(capsys, ["inspect", *MODEL[:3], "--input-shape", "3,28,28"], 2, "--input-shape")
    assert "expected input[1, 3, 28, 28] to have 1 channels" in err


def test_input_shape_too_large_to_allocate(capsys):
    err = refused(
        capsys, ["inspect", *MODEL[:3], "--input-shape", "1,2000000,2000000"], 1, "out of memory"
    )
    assert "--input-shape" in err


def test_classifier_with_fewer_outputs_than_classes(files, capsys):
    kw = json.dumps({"in_chans": 1, "num_classes": 2})
    argv = ["evaluate", "layermerge:resnet8", "--model-kwargs", kw, "--input-shape", "1,8,8"]
    refused(capsys, [*argv, "--data", f"mnist:{files['mnist']}"], 2, "2 outputs", "go up to 3")


# ------------------------------------------------------------------------ devices


@pytest.mark.parametrize("command", ["train", "latency", "benchmark", "evaluate"])
def test_unknown_device(command, capsys):
    out = ["--out", "o.csv"] if command in ("train", "latency") else []
    refused(capsys, [command, *MODEL, *out, "--device", "tpu"], 2, "'tpu'")


def test_unavailable_cuda_device(files, capsys):
    # without CUDA: "not available"; with it, device 99 does not exist
    argv = ["evaluate", *MODEL, "--data", f"mnist:{files['mnist']}", "--device", "cuda:99"]
    refused(capsys, argv, 2, "cuda")


# --------------------------------------------------------------------- output paths


def test_out_that_is_a_directory_is_refused_before_training(files, tmp_path, capsys):
    argv = ["train", *MODEL, "--data", f"mnist:{files['mnist']}", "--steps", "1"]
    refused(capsys, [*argv, "--out", tmp_path], 2, "--out", "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(capsys, [*argv, "--out", blocker / "w.pt"], 2, f"{blocker} is a file")
    refused(capsys, ["export", *MODEL, "--out-dir", blocker], 2, "--out-dir", "is a file")
    refused(capsys, ["inspect", *MODEL, "--chain-json", tmp_path], 2, "--chain-json")


def _fail_writes(monkeypatch, err: int):
    """Every rename into place fails as on a full (ENOSPC) or read-only (EROFS) disk."""

    def replace(src, dst, *a, **k):
        raise OSError(err, os.strerror(err), str(dst))

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_on_inspect_outputs(err, tmp_path, monkeypatch, capsys):
    _fail_writes(monkeypatch, err)
    for flag, name in (("--chain-json", "chain.json"), ("--options-csv", "options.csv")):
        target = tmp_path / name
        refused(capsys, ["inspect", *MODEL, flag, target], 1, name)
        assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no 0-byte or temporary file left behind


def test_failed_export_leaves_no_empty_model_file(tmp_path, monkeypatch, capsys):
    import layermerge.cli.model as cli_model

    def export(net, fmt, path, input_shape):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")  # as an exporter that dies on a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cli_model, "export", export)
    refused(capsys, ["export", *MODEL, "--out-dir", tmp_path, "--format", "onnx"], 1, "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_os_errors_name_the_file_and_the_fix():
    msg, hint, code = error_of(OSError(errno.ENOSPC, "No space left on device", "/x/t.csv"))
    assert "/x/t.csv" in msg and "space" in hint and code == 1
    msg, hint, code = error_of(OSError(errno.EROFS, "Read-only file system", "/ro/w.pt"))
    assert "/ro/w.pt" in msg and "read-only" in hint and code == 1
    msg, hint, code = error_of(IsADirectoryError(errno.EISDIR, "Is a directory", "/d"))
    assert "/d" in msg and code == 1
    assert error_of(FileNotFoundError(errno.ENOENT, "No such file", "/n"))[2] == 2


# ------------------------------------------------------------------- data problems


def _mnist_with_label(root: Path, label: int) -> Path:
    write_mnist_like(root, n_train=40, n_test=8, classes=4)
    labels = np.arange(8, dtype=np.uint8) % 4
    labels[5] = label
    write_idx(root / "t10k-labels-idx1-ubyte.gz", labels)
    return root


def test_label_beyond_the_classes_of_the_dataset(tmp_path, capsys):
    root = _mnist_with_label(tmp_path / "m", 12)
    argv = ["evaluate", *MODEL, "--data", f"mnist:{root}", "--no-progress"]
    refused(capsys, argv, 1, "t10k-labels-idx1-ubyte.gz", "label 12 of image 5")


def test_cifar_label_beyond_its_classes(tmp_path, capsys):
    root = write_cifar10(tmp_path / "c", per_batch=4)
    path = root / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch[b"labels"][2] = 10
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    kw = json.dumps({"num_classes": 10})
    argv = ["evaluate", "layermerge:resnet8", "--model-kwargs", kw, "--input-shape", "3,8,8"]
    refused(capsys, [*argv, "--data", f"cifar10:{root}", "--no-progress"], 1, "test_batch")


def test_malicious_cifar_pickle_is_refused(tmp_path, capsys):
    root = write_cifar10(tmp_path / "c", per_batch=4)
    marker = tmp_path / "pwned"
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": _Payload(str(marker))}, f, protocol=2)
    kw = json.dumps({"num_classes": 10})
    argv = ["evaluate", "layermerge:resnet8", "--model-kwargs", kw, "--input-shape", "3,8,8"]
    refused(capsys, [*argv, "--data", f"cifar10:{root}"], 1, "test_batch", "mkdir")
    assert not marker.exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_imagefolder_with_a_fake_jpg(tmp_path, workers, capsys):
    root = write_imagefolder(tmp_path / "f", per_class=2, size=(8, 8))
    fake = root / "val" / "dog" / "fake.jpg"
    fake.write_text("not an image")
    kw = json.dumps({"num_classes": 3})
    argv = ["evaluate", "layermerge:resnet8", "--model-kwargs", kw, "--input-shape", "3,8,8"]
    argv += ["--data", f"imagefolder:{root}", "--no-progress", "--workers", str(workers)]
    refused(capsys, argv, 1, fake, "not a readable image")


def test_unknown_or_missing_dataset_is_a_usage_error(tmp_path, capsys):
    refused(capsys, ["evaluate", *MODEL, "--data", "svhn:/x"], 2, "svhn")
    refused(capsys, ["evaluate", *MODEL, "--data", f"mnist:{tmp_path}/none"], 2, "none")


# ------------------------------------------------------------- conventions: json, debug


def test_json_errors_are_one_object_on_stdout(files, capsys):
    rc = main(["inspect", *MODEL, "--weights", str(files["dir"] / "garbage.pt"), "--json"])
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert rc == 1 and obj["exit_code"] == 1 and "garbage.pt" in obj["error"]
    assert set(obj) == {"error", "hint", "exit_code"} and err == ""
    rc = main(["verify", *MODEL, "--plans", "-1", "--json"])
    obj = json.loads(capsys.readouterr().out)
    assert rc == 2 and "--plans" in obj["error"] and "--help" in obj["hint"]


def test_debug_shows_the_traceback(files, capsys, monkeypatch):
    argv = ["inspect", *MODEL, "--weights", str(files["dir"] / "garbage.pt")]
    assert main([*argv, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith("layermerge inspect")
    monkeypatch.setenv("LAYERMERGE_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err


def test_an_unexpected_exception_is_one_line_too(monkeypatch, capsys):
    import layermerge.cli.model as cli_model

    def boom(*a, **k):
        raise KeyError("something internal")

    monkeypatch.setattr(cli_model, "build_space", boom)
    err = refused(capsys, ["inspect", *MODEL], 1, "KeyError", "--debug")
    assert "something internal" in err


def test_sample_on_a_full_disk_leaves_no_files(tmp_path, monkeypatch, capsys):
    _fail_writes(monkeypatch, errno.ENOSPC)
    argv = ["sample", "diffusers:ddpm-small", "--n", "1", "--steps", "1", "--no-progress"]
    argv += ["--out", tmp_path / "grid.png", "--device", "cpu"]
    refused(capsys, argv, 1, "grid.png", "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_train_on_a_full_disk_is_one_line(files, tmp_path, monkeypatch, capsys):
    _fail_writes(monkeypatch, errno.ENOSPC)
    argv = ["train", *MODEL, "--data", f"mnist:{files['mnist']}", "--steps", "1"]
    argv += ["--batch-size", "8", "--no-progress", "--eval-split", "none"]
    refused(capsys, [*argv, "--out", tmp_path / "w.pt"], 1, "No space left on device")
    assert not (tmp_path / "w.pt").exists()


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["export", *MODEL, "--plan", "nope.json", "--out-dir", "d"], "--plan nope.json"),
        (["benchmark", *MODEL, "--latency", "t.csv", "nope.csv"], "--latency nope.csv"),
        (["solve", "--latency", "nope.csv", "--budget-ms", "1", "--out", "p.json"], "--latency"),
    ],
)
def test_missing_input_files_are_refused_before_any_work(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("")
    refused(capsys, argv, 2, flag, "does not exist")


def test_device_defaults_to_cuda_when_available():
    from layermerge.cli.common import default_device

    assert default_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert default_device("cpu") == "cpu"
