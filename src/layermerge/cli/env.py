"""``layermerge env``: the versions, devices, threads and providers of this
environment, for bug reports."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

from .. import __version__
from .common import print_json

#: the packages whose versions a bug report needs (import name, distribution name)
PACKAGES = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("timm", "timm"),
    ("diffusers", "diffusers"),
    ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"),
    ("onnxscript", "onnxscript"),
    ("safetensors", "safetensors"),
    ("numpy", "numpy"),
    ("yaml", "pyyaml"),
    ("tqdm", "tqdm"),
    ("matplotlib", "matplotlib"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "env",
        help="print versions, devices, threads and ONNX Runtime providers (for bug reports)",
        description=(
            "Print the versions of Python, layermerge and the packages it uses, the CUDA "
            "devices torch sees, torch's thread count and ONNX Runtime's execution "
            "providers. Paste the output into a bug report."
        ),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_env)


def _version(dist: str) -> str | None:
    """The installed version of a distribution, without importing it (None: absent)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """What ``layermerge env`` prints, as a dict."""
    info: dict[str, Any] = {
        "layermerge": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "packages": {dist: _version(dist) for _, dist in PACKAGES},
    }
    import torch

    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "devices": []}
    cuda["torch_cuda"] = torch.version.cuda
    if cuda["available"]:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cuda["devices"].append(
                {"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
            )
    info["cuda"] = cuda
    info["torch_threads"] = torch.get_num_threads()
    info["torch_interop_threads"] = torch.get_num_interop_threads()
    info["mps"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    providers: list[str] | None = None
    if info["packages"]["onnxruntime"] is not None:
        try:
            ort = importlib.import_module("onnxruntime")
            providers = list(ort.get_available_providers())
        except Exception as e:  # a broken install is worth reporting, not a traceback
            providers = [f"(onnxruntime does not import: {type(e).__name__}: {e})"]
    info["onnxruntime_providers"] = providers
    info["env"] = {
        k: os.environ[k]
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
        if k in os.environ
    }
    return info


def cmd_env(args) -> int:
    info = environment()
    if args.json:
        print_json(info)
        return 0
    print(f"layermerge   {info['layermerge']}")
    print(f"python       {info['python']} ({info['platform']}, {info['cpu_count']} CPUs)")
    for name, version in info["packages"].items():
        print(f"{name:12s} {version or 'not installed'}")
    cuda = info["cuda"]
    if cuda["devices"]:
        names = ", ".join(
            f"{d['index']}: {d['name']} ({d['memory_gib']} GiB)" for d in cuda["devices"]
        )
        print(
            f"cuda         {len(cuda['devices'])} device(s): {names} (torch CUDA {cuda['torch_cuda']})"
        )
    else:
        built = (
            f"torch built with CUDA {cuda['torch_cuda']}"
            if cuda["torch_cuda"]
            else "CPU-only torch"
        )
        print(f"cuda         no device ({built})")
    print(
        f"threads      torch {info['torch_threads']} intra-op, {info['torch_interop_threads']} inter-op"
    )
    providers = info["onnxruntime_providers"]
    print(
        f"onnxruntime  providers: {', '.join(providers) if providers else 'onnxruntime not installed'}"
    )
    for k, v in info["env"].items():
        print(f"{k:12s} {v}")
    return 0
