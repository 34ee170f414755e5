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
    for name in ("torch", "numpy", "pyyaml", "tqdm", "safetensors"):
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
