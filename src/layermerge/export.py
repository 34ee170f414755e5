"""Export the deploy network (ONNX, torch.export, TorchScript) and load it back.

Every export is checked against PyTorch on the same input (relative error <=
1e-4 for float32). A compressed model can be loaded back in two ways:

* from an export: :func:`load_onnx` (ONNX Runtime session),
  :func:`load_program` (``torch.export.load``) or ``torch.jit.load``;
* from its source: the original model + the plan + the train-time weights
  (what ``layermerge finetune`` saves), with :func:`load_compressed` (the same
  function as :func:`layermerge.transform.deploy_network`).

A network of several inputs is exported with all of them: a diffusers UNet as
``(sample, timestep)`` (its family's :meth:`~layermerge.families.Family.export_module`),
checked against PyTorch at several timesteps. A module tells the exporters its
inputs through an ``export_examples(batch, seed)`` method; without one it takes
one tensor of ``input_shape``. :func:`onnx_module` wraps an ONNX file as a torch
module of the same inputs (e.g. to put it into a diffusers pipeline).
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


def export_examples(
    net: nn.Module, input_shape: Sequence[int], batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Example inputs of ``net``: its own ``export_examples(batch, seed)`` when it has
    one (a UNet's sample and timesteps), else one tensor of ``input_shape``."""
    own = getattr(net, "export_examples", None)
    if own is not None:
        return tuple(own(batch, seed))
    return (example_input(input_shape, batch=batch, seed=seed, dtype=_dtype(net)),)


def _batch_dims(xs: Sequence[torch.Tensor], auto: bool = False) -> tuple[dict, ...]:
    batch = torch.export.Dim("batch", min=1, max=4096)  # one batch size for every input
    return tuple({0: torch.export.Dim.AUTO if auto else batch} for _ in xs)


def _dynamic_batch(run, net: nn.Module | None = None):
    """``run(auto)`` with a batch dimension of 1..4096, or, where the model limits it
    (a diffusers UNet traces for batches up to 63), the range the exporter finds
    (``auto``: ``Dim.AUTO``). A module with ``export_batch_range = "auto"`` goes there
    at once (no failed first export)."""
    if getattr(net, "export_batch_range", None) == "auto":
        return run(True)
    try:
        return run(False)
    except Exception as e:
        if "Constraints violated" not in str(e):
            raise
        return run(True)


def export_onnx(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """ONNX with a dynamic batch dimension (torch.onnx dynamo exporter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = export_examples(net, input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = _dynamic_batch(
            lambda auto: torch.onnx.export(
                net.eval(), xs, dynamo=True, verbose=False, dynamic_shapes=_batch_dims(xs, auto)
            ),
            net,
        )
    program.save(str(path))
    return path


def export_program(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """A ``torch.export`` ExportedProgram (``.pt2``) with a dynamic batch dimension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = export_examples(net, input_shape)
    ep = _dynamic_batch(
        lambda auto: torch.export.export(net.eval(), xs, dynamic_shapes=_batch_dims(xs, auto)),
        net,
    )
    torch.export.save(ep, str(path))
    return path


def export_torchscript(net: nn.Module, path: str | Path, input_shape: Sequence[int]) -> Path:
    """TorchScript by tracing (the deploy network has no data-dependent control flow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    xs = export_examples(net, input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net.eval(), xs)
    scripted.save(str(path))
    return path


def load_onnx(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session; call ``run_onnx(session, x)`` to evaluate it."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=list(providers))


def run_onnx(session, *xs: torch.Tensor) -> torch.Tensor:
    """The first output of ``session`` on ``xs`` (in the order of its inputs)."""
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(xs):
        raise ValueError(
            f"this ONNX model takes {len(names)} input(s) ({', '.join(names)}), got {len(xs)}"
        )
    feed = {n: x.detach().cpu().numpy() for n, x in zip(names, xs)}
    return torch.from_numpy(session.run(None, feed)[0])


class OnnxModule(nn.Module):
    """An ONNX file as a torch module: ``forward(*inputs)`` runs it in ONNX Runtime
    (inputs in the file's order, e.g. ``(sample, timestep)``) and returns its first
    output on the inputs' device. No gradients; for inference."""

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
        super().__init__()
        self.path = str(path)
        self.session = load_onnx(path, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        device = xs[0].device if xs else torch.device("cpu")
        return run_onnx(self.session, *xs).to(device)

    def extra_repr(self) -> str:
        return f"{self.path}, inputs={self.input_names}"


def onnx_module(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """:class:`OnnxModule` of the file at ``path``."""
    return OnnxModule(path, providers)


def load_program(path: str | Path) -> nn.Module:
    return torch.export.load(str(path)).module()


def run_export(fmt: str, path: str | Path, *xs: torch.Tensor) -> torch.Tensor:
    """Evaluate an exported file on ``xs``."""
    if fmt == "onnx":
        return run_onnx(load_onnx(path), *xs)
    if fmt == "pt2":
        return load_program(path)(*xs)
    if fmt == "torchscript":
        return torch.jit.load(str(path))(*xs)
    raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")


def max_rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """The largest absolute difference of ``got`` from ``ref``, relative to the largest
    magnitude of ``ref`` (the measure of every export check)."""
    return (ref - got).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def export(
    net: nn.Module, fmt: str, path: str | Path, input_shape: Sequence[int], *, check: bool = True
) -> dict:
    """Export ``net`` in ``fmt`` and check it against PyTorch on a batch of 3 (a batch
    size the export never saw, which also checks the dynamic batch dimension; a
    UNet's three samples have three different timesteps)."""
    fn = {"onnx": export_onnx, "pt2": export_program, "torchscript": export_torchscript}.get(fmt)
    if fn is None:
        raise ValueError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    try:
        path = fn(net, path, input_shape)
    except Exception as e:
        raise ExportError(f"{fmt} export failed: {type(e).__name__}: {e}") from e
    result = {"format": fmt, "path": str(path)}
    if check:
        xs = export_examples(net, input_shape, batch=3, seed=1)
        with torch.no_grad():
            ref = net.eval()(*xs).double()
            got = run_export(fmt, path, *xs).double()
        err = max_rel_err(ref, got)
        result["max_rel_err"] = err
        result["inputs"] = [list(x.shape[1:]) for x in xs]
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
