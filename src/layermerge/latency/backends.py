"""Backends: run one module on one fixed input, and say under which settings.

PyTorch eager (CPU or CUDA, optionally through ``torch.compile``) and ONNX
Runtime with any list of execution providers. :func:`make_backend` builds one
from its settings (backend, device, threads, batch size, dtype, ...);
:meth:`Backend.meta` is what every measurement records.

Two costs that a layer timed alone pays and the same layer inside a network does
not are reported separately, so that the latency table can leave them out of its
entries: the fixed cost of one backend call (ONNX Runtime's run and binding, a
Python module call, a CUDA synchronisation; :meth:`Backend.call_overhead`), and,
on ONNX Runtime's CPU provider, the layout conversions around a lone conv
(ReorderInput/ReorderOutput to and from the blocked NCHWc layout, read from ORT's
profiler; :meth:`Backend.prepare_entry`). On the CPU with one thread calls are
timed on the process's CPU clock (:attr:`Backend.clock_name`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .timing import Measurement, TimingConfig, measure

BACKENDS = ("torch", "onnxruntime")
CLOCKS = ("auto", "cpu", "wall")
EXPORTERS = ("auto", "legacy", "dynamo")
DTYPES = ("float32", "float16", "bfloat16", "float64")


class BackendError(RuntimeError):
    """A backend cannot be used as configured (missing package, provider, device)."""


def input_shapes(input_shape: Sequence[Any]) -> list[tuple[int, ...]]:
    """The inputs of a module as a list of (C, H, W): ``input_shape`` is one shape,
    or a sequence of shapes for a module of several inputs."""
    if len(input_shape) and isinstance(input_shape[0], Sequence):
        return [tuple(s) for s in input_shape]
    return [tuple(input_shape)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


@dataclass(frozen=True)
class BackendSettings:
    """Everything a latency depends on besides the model.

    ``providers`` (ONNX Runtime) is the execution provider list in priority
    order, e.g. ``("TensorrtExecutionProvider", "CUDAExecutionProvider")``; by
    default the CPU provider, or the CUDA provider when ``device`` is cuda.
    ``compile`` (torch) runs the model through ``torch.compile``. ``exporter``
    (ONNX Runtime) is how models reach ONNX: the TorchScript-based ("legacy")
    exporter takes about 10 ms for a conv where the dynamo one takes about 1 s;
    "auto" uses legacy while this torch has it and dynamo otherwise.
    """

    backend: str = "torch"
    device: str = "cpu"
    threads: int = 1
    batch_size: int = 1
    dtype: str = "float32"
    providers: tuple[str, ...] | None = None
    compile: bool = False
    exporter: str = "auto"
    provider_options: tuple[dict, ...] | None = None
    clock: str = "auto"

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise BackendError(f"unknown clock {self.clock!r}; expected one of {', '.join(CLOCKS)}")
        if self.backend not in BACKENDS:
            raise BackendError(
                f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}"
            )
        if self.threads < 1:
            raise BackendError(f"threads must be >= 1, got {self.threads}")
        if self.batch_size < 1:
            raise BackendError(f"the batch size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise BackendError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.exporter not in EXPORTERS:
            raise BackendError(
                f"unknown exporter {self.exporter!r}; expected one of {', '.join(EXPORTERS)}"
            )
        if self.backend == "torch" and self.providers:
            raise BackendError("execution providers are an onnxruntime setting, not a torch one")
        if self.backend == "onnxruntime" and self.compile:
            raise BackendError("torch.compile is a torch setting, not an onnxruntime one")


class Backend:
    """Runs modules on one fixed random input; one instance per set of settings."""

    settings: BackendSettings

    def __init__(self, settings: BackendSettings) -> None:
        self.settings = settings
        self.torch_dtype = getattr(torch, settings.dtype)

    @property
    def on_cpu(self) -> bool:
        raise NotImplementedError

    @property
    def clock_name(self) -> str:
        """ "cpu" (the process's CPU time) or "wall".

        With one thread on the CPU a call's CPU time is its latency without the
        time the operating system gave the core to other processes, which on a
        shared machine is most of the noise (a 100 ms network on two cores shared
        with three busy jobs takes 300 ms of wall time and 100 ms of CPU time).
        With several threads CPU time adds up over threads, and a GPU's work is
        not CPU time: both use the wall clock. ``auto`` picks accordingly.
        """
        c = self.settings.clock
        if c == "auto":
            return "cpu" if self.on_cpu and self.settings.threads == 1 else "wall"
        return c

    @property
    def clock(self) -> Callable[[], float]:
        """The clock calls are timed with (seconds)."""
        return time.process_time if self.clock_name == "cpu" else time.perf_counter

    # Subclasses implement these two.
    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], Any]:
        """A callable that runs ``module`` once on a batch of ``input_shape`` (C, H, W)
        inputs and returns when the result is ready (device synchronised). A module of
        several inputs gets a sequence of shapes, one per input."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """The settings to record with every measurement made with this backend."""
        raise NotImplementedError

    def prepare_entry(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        statistic: str = "min",
        before_call: Callable[[], None] | None = None,
    ) -> tuple[Callable[[], Any], float]:
        """Like :meth:`prepare`, for a layer timed on its own: also returns the time
        (ms) one call spends on work that the same layer inside a network does not
        do, such as layout conversions at the model's input and output.
        ``before_call`` runs before each call that this time is read from: the cache
        eviction of the timed calls, so that it is read under the same conditions."""
        return self.prepare(module, input_shape), 0.0

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Context held around measurements: PyTorch runs on the backend's thread
        count inside it and on the caller's outside (so that training between two
        measurements is not left on one thread); no autograd bookkeeping for torch."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.settings.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def examples(self, input_shape: Sequence[Any], seed: int = 0) -> list[torch.Tensor]:
        """One example per input (see :func:`input_shapes`)."""
        return [self.example(s, seed + i) for i, s in enumerate(input_shapes(input_shape))]

    def example(self, input_shape: Sequence[int], seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.settings.batch_size, *input_shape, generator=g)
        return x.to(self.torch_dtype)

    def call_overhead(self, config: TimingConfig | None = None) -> Measurement:
        """The fixed cost of one call: a ReLU on a single number, timed like an entry."""
        run = self.prepare(nn.ReLU(), (1, 1, 1))
        with self.session():
            return measure(
                run, replace(config or TimingConfig(), rel_tol=0.01, min_runs=50), self.clock
            )


def _torch_versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__.split("+")[0]}


class TorchBackend(Backend):
    """PyTorch eager (or ``torch.compile``) on CPU or CUDA."""

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        self.device = torch.device(settings.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendError("--device cuda: this torch sees no CUDA device")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            # cuDNN picks the fastest algorithm per shape during warm-up.
            torch.backends.cudnn.benchmark = True
        elif self.device.type != "cpu":
            raise BackendError(f"unsupported device {settings.device!r}; use cpu or cuda")

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], Any]:
        m = copy.deepcopy(module).eval().to(device=self.device, dtype=self.torch_dtype)
        for p in m.parameters():
            p.requires_grad_(False)
        if self.settings.compile:
            m = torch.compile(m, dynamic=False)
        xs = [x.to(self.device) for x in self.examples(input_shape)]
        if self.device.type == "cuda":
            sync = self._sync

            def run() -> None:
                m(*xs)
                sync()

            return run
        if len(xs) > 1:
            return lambda: m(*xs)
        x = xs[0]
        return lambda: m(x)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with super().session(), torch.inference_mode():
            yield

    def meta(self) -> dict[str, Any]:
        s = self.settings
        versions = _torch_versions()
        if self.device.type == "cuda":
            versions["cuda"] = str(torch.version.cuda)
            versions["cudnn"] = str(torch.backends.cudnn.version())
            name = torch.cuda.get_device_name(self.device)
        else:
            name = _cpu_name()
        return {
            "backend": "torch.compile" if s.compile else "torch",
            "clock": self.clock_name,
            "device": str(self.device),
            "device_name": name,
            "providers": [],
            "compile": s.compile,
            "exporter": None,
            "threads": s.threads,
            "batch_size": s.batch_size,
            "dtype": s.dtype,
            "versions": versions,
        }


def _default_providers(device: str) -> tuple[str, ...]:
    if device.startswith("cuda"):
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    return ("CPUExecutionProvider",)


_PROFILED_CALLS = 6
# Layout conversions ONNX Runtime inserts around a model's convs (CPU provider).
_LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


def _layout_ms(profile_file: str, statistic: str) -> float:
    """Per call, the time of the layout-conversion nodes in an ONNX Runtime profile
    (first call left out: it includes one-off allocations)."""
    try:
        with open(profile_file) as f:
            events = json.load(f)
    finally:
        with contextlib.suppress(OSError):
            os.remove(profile_file)
    per_op: dict[str, list[float]] = {}
    for ev in events:
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and args.get("op_name") in _LAYOUT_OPS:
            if str(ev.get("name", "")).endswith("_kernel_time"):
                per_op.setdefault(ev["name"], []).append(float(ev["dur"]) / 1e3)
    total = 0.0
    pick = np.min if statistic == "min" else np.median
    for durs in per_op.values():
        durs = durs[1:] or durs
        total += float(pick(durs))
    return total


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_GPU_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime with a list of execution providers (CPU, CUDA, TensorRT, ...).

    Models are exported to ONNX with fixed shapes; inputs stay bound to the
    session's device (IO binding), so no host-device copy is timed.
    """

    def __init__(self, settings: BackendSettings) -> None:
        super().__init__(settings)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "the onnxruntime backend needs the packages onnx and onnxruntime "
                "(pip install 'layermerge[export]')"
            ) from None
        self.ort = ort
        self.providers = tuple(settings.providers or _default_providers(settings.device))
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BackendError(
                f"execution provider(s) {', '.join(missing)} are not available in this "
                f"onnxruntime (available: {', '.join(available)}); install the matching "
                "onnxruntime build or choose other providers"
            )
        gpu = self.providers[0] in _GPU_PROVIDERS
        self.io_device = "cuda" if gpu else "cpu"
        self.device_id = 0
        if ":" in settings.device:
            self.device_id = int(settings.device.split(":", 1)[1])
        self.exporter = self._resolve_exporter(settings.exporter)

    @property
    def on_cpu(self) -> bool:
        return self.io_device == "cpu"

    def _resolve_exporter(self, exporter: str) -> str:
        if exporter != "auto":
            return exporter
        try:
            self._export(nn.ReLU(), torch.zeros(1, 1, 1, 1), "legacy")
        except Exception:
            return "dynamo"
        return "legacy"

    def _export(self, module: nn.Module, x: torch.Tensor | tuple, exporter: str) -> bytes:
        xs = x if isinstance(x, tuple) else (x,)
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation on every call.
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                buf = io.BytesIO()
                torch.onnx.export(
                    module,
                    xs,
                    buf,
                    dynamo=False,
                    input_names=["x"] + [f"x{i}" for i in range(1, len(xs))],
                    output_names=["y"],
                    opset_version=17,
                )
                return buf.getvalue()
            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(module, xs, dynamo=True, verbose=False)
            return prog.model_proto.SerializeToString()

    def export(self, module: nn.Module, input_shape: Sequence[int]) -> bytes:
        """``module`` as an ONNX model for this backend's batch size and dtype."""
        m = copy.deepcopy(module).eval().to(dtype=self.torch_dtype)
        xs = tuple(self.examples(input_shape))
        with torch.no_grad():
            return self._export(m, xs if len(xs) > 1 else xs[0], self.exporter)

    def session_options(self):
        so = self.ort.SessionOptions()
        so.intra_op_num_threads = self.settings.threads
        so.inter_op_num_threads = 1
        so.execution_mode = self.ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        return so

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> Callable[[], Any]:
        return self._prepare(module, input_shape, None)

    def prepare_entry(
        self,
        module: nn.Module,
        input_shape: Sequence[int],
        statistic: str = "min",
        before_call: Callable[[], None] | None = None,
    ) -> tuple[Callable[[], Any], float]:
        """On the CPU provider a conv alone runs as ReorderInput -> Conv (blocked NCHWc
        layout) -> ReorderOutput; inside a network the layout stays blocked from conv
        to conv, so the two reorders are not part of the conv's cost there. Their time
        is read from ONNX Runtime's profiler over the first calls (which double as
        warm-up), each preceded by ``before_call`` as the timed calls are: a reorder
        that reads a cold input takes twice as long as one that reads it hot
        (MobileNetV2's entries), so reading it hot and subtracting it from cold calls
        left most of it in the entries. Profiling is then switched off for the timed
        calls."""
        prefix = os.path.join(tempfile.gettempdir(), f"layermerge-prof-{os.getpid()}")
        run = self._prepare(module, input_shape, prefix)
        for _ in range(_PROFILED_CALLS):
            if before_call is not None:
                before_call()
            run()
        return run, _layout_ms(run.session.end_profiling(), statistic)

    def _prepare(
        self, module: nn.Module, input_shape: Sequence[int], profile_prefix: str | None
    ) -> Callable[[], Any]:
        model = self.export(module, input_shape)
        opts = list(self.settings.provider_options) if self.settings.provider_options else None
        so = self.session_options()
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        sess = self.ort.InferenceSession(
            model, so, providers=list(self.providers), provider_options=opts
        )
        used = sess.get_providers()
        if used[0] != self.providers[0]:
            raise BackendError(
                f"onnxruntime runs this model on {used[0]}, not on the requested "
                f"{self.providers[0]}; check the provider's installation"
            )
        binding = sess.io_binding()
        values = []  # kept alive with the callable: the binding refers to them
        for inp, x in zip(sess.get_inputs(), self.examples(input_shape), strict=True):
            values.append(
                self.ort.OrtValue.ortvalue_from_numpy(x.numpy(), self.io_device, self.device_id)
            )
            binding.bind_ortvalue_input(inp.name, values[-1])
        # Outputs are allocated once, as a network's planned intermediate buffers are;
        # a fresh allocation per call would be timed in every entry but not in a network.
        for out in sess.get_outputs():
            if all(isinstance(d, int) for d in out.shape):
                y = self.ort.OrtValue.ortvalue_from_shape_and_type(
                    out.shape, _ORT_TYPES.get(out.type, np.float32), self.io_device, self.device_id
                )
                binding.bind_ortvalue_output(out.name, y)
            else:
                binding.bind_output(out.name, self.io_device, self.device_id)

        def run() -> None:
            sess.run_with_iobinding(binding)

        run.session = sess
        run.inputs = values
        return run

    def meta(self) -> dict[str, Any]:
        import onnx

        s = self.settings
        versions = _torch_versions()
        versions["onnxruntime"] = self.ort.__version__
        versions["onnx"] = onnx.__version__
        if self.io_device == "cuda":
            name = (
                torch.cuda.get_device_name(self.device_id) if torch.cuda.is_available() else "gpu"
            )
            device = f"cuda:{self.device_id}"
        else:
            name, device = _cpu_name(), "cpu"
        return {
            "backend": "onnxruntime:" + "+".join(self.providers),
            "clock": self.clock_name,
            "device": device,
            "device_name": name,
            "providers": list(self.providers),
            "compile": False,
            "exporter": self.exporter,
            "threads": s.threads,
            "batch_size": s.batch_size,
            "dtype": s.dtype,
            "versions": versions,
        }


def make_backend(settings: BackendSettings | None = None, **kw: Any) -> Backend:
    """A backend from settings (or the fields of :class:`BackendSettings` as keywords)."""
    if settings is None:
        if isinstance(kw.get("providers"), list | str):
            p = kw["providers"]
            kw["providers"] = tuple(p.split(",") if isinstance(p, str) else p)
        settings = BackendSettings(**kw)
    elif kw:
        settings = replace(settings, **kw)
    if settings.backend == "torch":
        return TorchBackend(settings)
    return OnnxRuntimeBackend(settings)
