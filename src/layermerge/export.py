"""Export the deploy network (ONNX, torch.export, TorchScript) and load it back.

Every export is checked against PyTorch on the same input (relative error <=
1e-4 for float32). A compressed model can be loaded back in two ways:

* from an export: :func:`load_onnx` (ONNX Runtime session),
  :func:`load_program` (``torch.export.load``) or ``torch.jit.load``;
* from its source: the original model + the plan + the train-time weights
  (what ``layermerge finetune`` saves), with :func:`load_compressed` (the same
  function as :func:`layermerge.transform.deploy_network`).

A network that takes more than one input (a UNet's ``(x, t)``) is exported as
its family's one-input module: ``deploy_network(..., one_input=True)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .transform import deploy_network

#: export format -> file extension
FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".ts"}
EXPORT_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """An export failed or does not match PyTorch."""


def example_input(
    input_shape: Sequence[int], batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_shape, generator=g).to(dtype)


def _batch_dim():
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_onnx(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """ONNX with a dynamic batch dimension (torch.onnx dynamo exporter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(input_shape, dtype=_dtype(net))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net.eval(), (x,), dynamo=True, verbose=False, dynamic_shapes=_batch_dim()
        )
    program.save(str(path))
    return path


def export_program(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """A ``torch.export`` ExportedProgram (``.pt2``) with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(input_shape, dtype=_dtype(net))
    ep = torch.export.export(net.eval(), (x,), dynamic_shapes=_batch_dim())
    torch.export.save(ep, str(path))
    return path


def export_torchscript(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """TorchScript by tracing (the deploy network has no data-dependent control flow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(input_shape, dtype=_dtype(net))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net.eval(), x)
    scripted.save(str(path))
    return path


def load_onnx(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session; call ``run_onnx(session, x)`` to evaluate it."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=list(providers))


def run_onnx(session, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def load_program(path: str | Path) -> nn.Module:
    return torch.export.load(str(path)).module()


def run_export(fmt: str, path: str | Path, x: torch.Tensor) -> torch.Tensor:
    """Evaluate an exported file on ``x``."""
    if fmt == "onnx":
        return run_onnx(load_onnx(path), x)
    if fmt == "pt2":
        return load_program(path)(x)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(x)
    raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")


def export(
    net: nn.Module, fmt: str, path: str | Path, input_shape: Sequence[int], *, check: bool = True
) -> dict:
    """Export ``net`` in ``fmt`` and check it against PyTorch on a batch of 3 (a batch
    size the export never saw, which also checks the dynamic batch dimension)."""
    fn = {"onnx": export_onnx, "pt2": export_program, "torchscript": export_torchscript}.get(fmt)
    if fn is None:
        raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    try:
        path = fn(net, path, input_shape)
    except Exception as e:
        raise ExportError(f"{fmt} export failed: {type(e).__name__}: {e}") from e
    result = {"format": fmt, "path": str(path)}
    if check:
        x = example_input(input_shape, batch=3, seed=1, dtype=_dtype(net))
        with torch.no_grad():
            ref = net.eval()(x).double()
            got = run_export(fmt, path, x).double()
        err = (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        result["max_rel_err"] = err
        if not err <= EXPORT_TOLERANCE:
            raise ExportError(
                f"the {fmt} export at {path} differs from PyTorch: relative error {err:.2e} > "
                f"{EXPORT_TOLERANCE:.0e}"
            )
    return result


#: the deploy network from the traced original model, a plan (or plan file) and
#: optionally the fine-tuned train-time weights: :func:`layermerge.transform.deploy_network`
load_compressed = deploy_network


def _dtype(net: nn.Module) -> torch.dtype:
    for p in net.parameters():
        return p.dtype
    return torch.float32
