"""What a person ships: one folder per plan, and timings of the shipped ONNX file.

``RUN_DIR/<method>-<budget>/`` (e.g. ``layermerge-0.70/``) holds

- ``model.onnx``: the deploy network as ONNX, the very file the onnxruntime
  benchmark timed (same bytes, sha256 in ``model.json``);
- ``model.pt2``: the ``torch.export`` program (when ``export.formats`` lists pt2);
- ``weights.safetensors``: the deploy network's weights, which
  :func:`layermerge.load_shipped` puts into the network rebuilt from the original
  model and ``plan.json``;
- ``plan.json``, ``model.json`` (what it was made from) and ``README.md`` (a model
  card: quality, measured latency and speed-up per backend, how to load it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..channelprune import PRUNED_SCHEMA, layer_widths, tensor_shapes
from ..export import FORMATS
from ..plan import Plan
from .run import Run

#: file name in a plan folder of each export format
SHIPPED = {fmt: f"model{ext}" for fmt, ext in FORMATS.items()}


def plan_folder(row: dict[str, Any]) -> str:
    """The folder of a report row: method and budget, e.g. ``layermerge-0.70``."""
    return f"{row['method']}-{row['budget_frac']:.2f}"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """``dst`` with the bytes of ``src`` (a hard link where the file system allows)."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def ship(run: Run, row: dict[str, Any], plan: Plan | None) -> dict[str, str]:
    """Write the plan folder of ``row``; returns its files (relative to the run dir).
    ``plan`` None: a network row (channelprune), whose folder has ``pruning.json``
    (how to rebuild it) instead of ``plan.json``."""
    rd = run.rd
    folder = rd / plan_folder(row)
    folder.mkdir(exist_ok=True)
    files: dict[str, str] = {}
    for fmt, r in row.get("exports", {}).items():
        if fmt == "weights":
            continue
        dst = folder / SHIPPED[fmt]
        _place(rd / r["path"], dst)
        files[fmt] = str(dst.relative_to(rd))
    weights = row.get("exports", {}).get("weights")
    if weights:
        _place(rd / weights["path"], folder / "weights.safetensors")
        files["weights"] = str((folder / "weights.safetensors").relative_to(rd))
    if plan is not None:
        plan.save(folder / "plan.json")
        files["plan"] = str((folder / "plan.json").relative_to(rd))
    else:
        widths = None  # the pruned network's structure, read off its weights' shapes
        if weights and run.base_model is not None:
            shapes = tensor_shapes(folder / "weights.safetensors")
            widths = layer_widths(run.base_model, shapes)
        info = pruning_info(row, widths)
        (folder / "pruning.json").write_text(json.dumps(info, indent=2) + "\n")
        files["pruning"] = str((folder / "pruning.json").relative_to(rd))
    meta = {
        "model": run.cfg.model,
        "model_kwargs": dict(run.cfg.model_kwargs),
        "input_shape": list(run.input_shape),
        "family": run.traced.family.name,
        "method": row["method"],
        "budget_frac": row["budget_frac"],
        ("network_digest" if plan is None else "plan_digest"): row["digest"],
        "files": {k: Path(v).name for k, v in files.items()},
        "sha256": {
            Path(v).name: sha256(rd / v) for k, v in files.items() if k not in ("plan", "pruning")
        },
    }
    (folder / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    files["meta"] = str((folder / "model.json").relative_to(rd))
    (folder / "README.md").write_text(model_card(run, row, meta))
    files["card"] = str((folder / "README.md").relative_to(rd))
    return files


def pruning_info(row: dict[str, Any], widths: dict[str, int] | None = None) -> dict[str, Any]:
    """What ``pruning.json`` of a network row says: the ratio and how it was pruned,
    and the output width of every conv and linear layer of the pruned network
    (``widths``, by module name), from which :func:`layermerge.load_shipped` rebuilds it
    on the unpruned architecture without the base weights."""
    info: dict[str, Any] = {
        "schema": PRUNED_SCHEMA,
        "method": row["method"],
        "ratio": row["ratio"],
        "pruning": row.get("search", {}).get("pruning"),
    }
    if widths is not None:
        info["widths"] = {k: int(v) for k, v in widths.items()}
    return info


def _fmt(v: Any, nd: int = 3) -> str:
    return "–" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def model_card(run: Run, row: dict[str, Any], meta: dict[str, Any]) -> str:
    """A short model card: what this is, its measured quality and speed, how to load it."""
    cfg, base = run.cfg, run.base
    name = plan_folder(row)
    lines = [f"# {cfg.model}: {row['method']} at budget {row['budget_frac']:g}", ""]
    if cfg.is_smoke:
        lines += ["**Smoke run**: shrunk settings; the numbers say nothing about the method.", ""]
    lines += [
        "Made by `layermerge compress` (the report is `../report.md`); input "
        f"{list(run.input_shape)} per sample, batch dimension dynamic. Every number was "
        "measured by the run.",
        "",
        "| | base | this model |",
        "|---|---|---|",
    ]
    for m in run.hooks.metrics:
        k = m["key"]
        lines.append(
            f"| {m.get('label', k)} | {_fmt(base.get(k), m.get('digits', 2))} | "
            f"{_fmt(row.get('exported_quality', {}).get(k, row.get(k)), m.get('digits', 2))} |"
        )
    for b, ms in row.get("measured_ms_by_backend", {}).items():
        base_ms = row.get("benchmarks", {}).get(b, {}).get("baseline_ms")
        lines.append(f"| latency {b} (ms) | {_fmt(base_ms)} | {_fmt(ms)} |")
        lines.append(f"| speed-up {b} | 1 | {_fmt(row['speedup_by_backend'].get(b), 2)} |")
    lines.append(f"| parameters | {_fmt(base.get('params'))} | {_fmt(row.get('params'))} |")
    timed = row.get("benchmarks", {}).get("onnxruntime", {}).get("timed")
    if timed:
        lines += ["", f"The onnxruntime latency is of {timed}."]
    if (row.get("seeds") or 1) > 1:
        lines += [
            "",
            f"The {'plan' if 'plan' in meta['files'] else 'network'} was fine-tuned "
            f"{row['seeds']} times with different seeds; these "
            f"files (and the quality above) are the fine-tune of median quality (seed "
            f"{row.get('exported_seed')}); the run's report gives the mean and SD.",
        ]
    files = meta["files"]
    lines += ["", "## Files", ""]
    what = {
        "onnx": "the deploy network as ONNX",
        "pt2": "the `torch.export` program",
        "torchscript": "TorchScript",
        "weights": "the deploy network's weights",
        "plan": "the plan (what is kept, merged and dropped)",
        "pruning": "the pruning ratio and settings (how to rebuild the network)",
    }
    if "pruning" in files:
        what["weights"] = "the fine-tuned pruned network's weights (BatchNorm not folded)"
    for k, f in files.items():
        lines.append(f"- [`{f}`]({f}): {what.get(k, k)}")
    lines += ["- [`model.json`](model.json): what it was made from, sha256 of every file", ""]
    lines += ["## How to load", "", "```python"]
    if "onnx" in files:
        lines += [
            "import onnxruntime as ort",
            f'session = ort.InferenceSession("{name}/model.onnx")',
            "y = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]",
            "",
        ]
    if "pt2" in files:
        lines += ["import torch", f'net = torch.export.load("{name}/model.pt2").module()', ""]
    if "pruning" in files:  # a network row: the architecture cut to pruning.json's widths
        lines += [
            "# the unpruned architecture cut to the widths of pruning.json, with the",
            "# fine-tuned weights (BatchNorm not folded); needs torch-pruning",
            "import layermerge as lm",
        ]
        if cfg.model.startswith("object:"):
            lines.append(f'net = lm.load_shipped("{name}", model=original_model)')
        else:
            lines.append(f'net = lm.load_shipped("{name}")')
        return "\n".join([*lines, "```", ""])
    if cfg.model.startswith("object:"):  # made from a Python object: pass it
        load = f'net = lm.load_shipped("{name}", model=original_model)'
    else:
        load = f'net = lm.load_shipped("{name}")  # rebuilt from {cfg.model} + the plan'
    lines += ["import layermerge as lm", load, "```", ""]
    return "\n".join(lines)


def file_run(backend, path: Path, input_shape):
    """The backend's timed call of the ONNX file at ``path`` (its session options,
    providers and bound inputs; the file instead of a fresh export)."""
    data = Path(path).read_bytes()
    b = copy.copy(backend)
    b.export = lambda module, shape: data
    return b.prepare(nn.Identity(), input_shape)
