"""Installing layermerge as a library: the core dependencies cover what the core
commands import, the extras exist, and ``layermerge env`` reports the environment."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_core_dependencies_cover_the_core_commands():
    deps = " ".join(_project()["dependencies"])
    # compress, demo and train read YAML configs, show progress bars and load
    # .safetensors weights
    # read .safetensors weights, and time and export with ONNX Runtime / ONNX (the
    # default latency backend and export format)
    for name in ("torch", "numpy", "pyyaml", "tqdm", "safetensors", "onnx", "onnxruntime"):
        assert name in deps, name


def test_extras_and_all():
    extras = _project()["optional-dependencies"]
    assert {"vision", "diffusion", "export", "report", "dev", "all"} <= set(extras)
    (all_,) = extras["all"]
    for name in ("vision", "diffusion", "export", "report", "dev"):
        assert name in all_


def test_env_command_json():
    out = subprocess.run(
        [sys.executable, "-m", "layermerge.cli", "env", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    info = json.loads(out)
    assert info["python"] == sys.version.split()[0]
    import torch

    assert (
        info["packages"]["torch"] == torch.__version__.split("+")[0]
        or info["packages"]["torch"] == torch.__version__
    )
    assert info["torch_threads"] >= 1
    assert isinstance(info["cuda"]["devices"], list)
    assert info["cuda"]["available"] == torch.cuda.is_available()
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]


def test_env_command_text():
    out = subprocess.run(
        [sys.executable, "-m", "layermerge.cli", "env"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for word in ("python", "torch", "onnxruntime", "threads", "cuda"):
        assert word in out


def test_a_report_without_matplotlib_has_no_figures(tmp_path, monkeypatch):
    """compress ends with the report: without the [report] extra it is written
    without figures, saying so, instead of failing."""
    import builtins

    from layermerge.report import write_report

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **kw):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    report = {
        "model": "m",
        "base": {"latency_ms": {"torch": 1.0}, "accuracy": 90.0},
        "rows": [],
        "notes": [],
        "chain_length": 3,
    }
    path = write_report(tmp_path, report, curves={"layermerge": {}})
    assert "need matplotlib" in path.read_text()
    assert not list(tmp_path.glob("*.png"))
