"""Latency: backends, the latency table and end-to-end benchmarks (DESIGN §6).

Three parts, each usable alone:

- **Backends** run one module on one fixed input: PyTorch eager (CPU or CUDA,
  optionally through ``torch.compile``) and ONNX Runtime with any list of
  execution providers. :func:`make_backend` builds one from its settings
  (backend, device, threads, batch size, dtype, ...); :meth:`Backend.meta` is
  what every measurement records.
- **The latency table** (:func:`build_latency_table`): one entry per option, the
  merged conv the option produces plus the activation its block end keeps,
  timed at the real input shape of the block's first node. Entries are written
  one at a time, so an interrupted build resumes where it stopped. The sidecar
  holds ``constant_ms``, the latency of everything outside the chain, so that
  ``constant_ms + sum of a plan's entries`` predicts the plan's latency.
- **Benchmarks** (:func:`benchmark`) time whole networks, original (BN folded)
  against merged, interleaved.

How the constant is measured. The BN-folded network of the identity plan is
timed as a whole, and the entries of its blocks (one per conv) are subtracted:
``constant = T(identity network) - sum_i T(conv i)``. The network is timed with
single calls spread over the whole build, pooled with a final burst, so that
it sees the same load of other jobs as the entries did. The prediction for the
identity plan is therefore exact by construction, and for any other plan its
error is the error in the entries plus whatever does not add up between convs
timed alone and convs inside a network: residual adds that a plan merges into
a kernel (their cost stays in the constant), cache effects between neighbouring
layers, and work a lone layer does that a layer in a network does not. Two such
costs are removed explicitly, so that they end up once in the constant instead
of once per entry, and one is emulated:

- the fixed cost of one backend call (ONNX Runtime's run and binding, a Python
  module call, a CUDA synchronisation), measured on a one-element model;
- on ONNX Runtime's CPU provider, the layout conversions around a lone conv
  (ReorderInput/ReorderOutput to and from the blocked NCHWc layout), which a
  network pays at its ends only. Their time is read from ORT's profiler
  (``layout_ms`` per entry);
- the caches: timed back to back, a layer finds its weights and input hot from
  its own previous call, which inside a network it never does. The core's
  private caches are evicted before every timed call (``TimingConfig.flush_mb``,
  by default twice the L2 size).

The entry's own statistic is kept in ``min_ms``/``median_ms``; ``latency_ms``
is that minus both corrections. On the CPU with one thread calls are timed on
the process's CPU clock (see :attr:`Backend.clock_name`).

Timing protocol (:class:`TimingConfig`). Each entry is warmed up for a short
time, then timed call by call, and summarised by the minimum (default) or the
median of its calls. The minimum is the default because these machines share
their cores: whether another job runs beside a measurement moves a call's time
by up to 1.5x for minutes at a time, so medians of entries timed at different
moments do not add up, while the undisturbed time does. Timing stops when the
statistic is stable to ``rel_tol`` (minimum: the later half of the calls found
nothing faster than the earlier half by more than that; median: its
distribution-free 95 % confidence interval is that narrow), or at a time cap.
Cheap, stable entries finish after a few dozen calls; costly ones stop at the
cap after a few calls, which is where their statistic is already precise. The
reference implementation's fixed protocol (300 warm-up + 200 timed calls) is
:meth:`TimingConfig.reference`.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import io
import math
import os
import platform
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .chain import Chain
from .plan import Plan, PlanBlock, PlanError, check_plan_for_chain
from .space import SearchSpace, build_space, merged_geometry
from .tables import (
    LATENCY_SETTINGS,
    Table,
    TableError,
    TableWriter,
    check_same_settings,
    concat_tables,
    format_key,
    read_table,
    required_columns,
)
from .trace import TracedModel, make_activation

BACKENDS = ("torch", "onnxruntime")
STATISTICS = ("min", "median")
CLOCKS = ("auto", "cpu", "wall")
EXPORTERS = ("auto", "legacy", "dynamo")
DTYPES = ("float32", "float16", "bfloat16", "float64")
#: settings that must agree before latencies may be combined or compared. The
#: table layer checks :data:`layermerge.tables.LATENCY_SETTINGS`; the backend
#: descriptor stored under ``backend`` already names providers and compilation,
#: so those checks see them too. This list adds what a descriptor cannot hold.
SETTINGS_KEYS = (
    *LATENCY_SETTINGS,
    "providers",
    "compile",
    "device_name",
    "exporter",
    "statistic",
    "clock",
)
LATENCY_COLUMNS = (
    *required_columns("latency"),
    "median_ms",
    "min_ms",
    "layout_ms",
    "p25_ms",
    "p75_ms",
    "ci_rel",
    "runs",
    "warmup_runs",
    "stopped",
    "elapsed_s",
    "in_channels",
    "out_channels",
    "padding",
    "groups",
    "activation",
    "input_shape",
    "run",
)


class BackendError(RuntimeError):
    """A backend cannot be used as configured (missing package, provider, device)."""


# ---------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class TimingConfig:
    """How one latency is measured.

    Adaptive (default): warm up for ``warmup_s`` (at least ``min_warmup_runs``
    calls, at most ``warmup_runs``), then time single calls until ``statistic``
    ("min" or "median") is stable to ``rel_tol`` (checked from ``min_runs`` calls
    on, see :func:`_stable`), or ``max_time_s`` of timed calls have passed (after
    at least ``min_runs_capped`` calls), or ``max_runs`` calls were made.

    Fixed (``fixed=True``): exactly ``warmup_runs`` warm-up and ``min_runs`` timed calls.
    """

    warmup_runs: int = 200
    warmup_s: float = 0.05
    min_warmup_runs: int = 2
    min_runs: int = 12
    min_runs_capped: int = 3
    max_runs: int = 1000
    max_time_s: float = 0.5
    rel_tol: float = 0.02
    fixed: bool = False
    statistic: str = "min"
    flush_mb: float | None = None  # None: twice the core's L2 cache (see _flusher)

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(
                f"unknown statistic {self.statistic!r}; expected one of {', '.join(STATISTICS)}"
            )

    @classmethod
    def reference(
        cls, warmup_runs: int = 300, runs: int = 200, statistic: str = "min"
    ) -> TimingConfig:
        """The reference implementation's protocol: fixed warm-up and timed calls."""
        return cls(
            warmup_runs=warmup_runs,
            min_runs=runs,
            max_runs=runs,
            fixed=True,
            statistic=statistic,
        )

    def describe(self) -> dict[str, Any]:
        flush = default_flush_mb() if self.flush_mb is None else self.flush_mb
        if self.fixed:
            return {
                "protocol": "fixed",
                "warmup_runs": self.warmup_runs,
                "runs": self.min_runs,
                "statistic": self.statistic,
                "flush_mb": flush,
            }
        return {"protocol": "adaptive", **asdict(self), "flush_mb": flush}


@dataclass
class Measurement:
    """The statistics of one timed thing (milliseconds)."""

    median_ms: float
    min_ms: float
    p25_ms: float
    p75_ms: float
    ci_rel: float  # half-width of the 95 % CI of the median, relative to the median
    runs: int
    warmup_runs: int
    elapsed_s: float
    stopped: str  # "stable", "time", "max_runs", "fixed"
    samples_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """The statistics without the samples."""
        d = asdict(self)
        d.pop("samples_ms")
        return d

    def value(self, statistic: str) -> float:
        """The summary ``statistic`` ("min" or "median") in ms."""
        if statistic == "min":
            return self.min_ms
        if statistic == "median":
            return self.median_ms
        raise ValueError(f"unknown statistic {statistic!r}")

    @classmethod
    def from_samples(
        cls, samples_ms: Sequence[float], warmup_runs: int, elapsed_s: float, stopped: str
    ) -> Measurement:
        x = np.sort(np.asarray(samples_ms, dtype=np.float64))
        med = float(np.median(x))
        return cls(
            median_ms=med,
            min_ms=float(x[0]),
            p25_ms=float(np.percentile(x, 25)),
            p75_ms=float(np.percentile(x, 75)),
            ci_rel=_median_ci_rel(x),
            runs=len(x),
            warmup_runs=warmup_runs,
            elapsed_s=elapsed_s,
            stopped=stopped,
            samples_ms=tuple(float(v) for v in samples_ms),
        )


def _median_ci_rel(sorted_x: np.ndarray) -> float:
    """Half-width of the distribution-free 95 % confidence interval of the median
    (order statistics n/2 -+ 0.98 sqrt(n)), relative to the median."""
    n = len(sorted_x)
    if n < 2:
        return math.inf
    half = 0.98 * math.sqrt(n)
    lo = max(int(math.floor(n / 2 - half)), 0)
    hi = min(int(math.ceil(n / 2 + half)), n - 1)
    med = float(np.median(sorted_x))
    if med <= 0:
        return math.inf
    return float(sorted_x[hi] - sorted_x[lo]) / 2 / med


def _stable(samples: list[float], cfg: TimingConfig) -> bool:
    """Whether more calls would not move the statistic by more than ``rel_tol``.

    median: its 95 % confidence interval is that narrow. min: the later half of the
    calls found nothing faster than the earlier half by more than that (the minimum
    only moves when an undisturbed call happens, so this asks whether they still do).
    """
    if cfg.statistic == "median":
        return _median_ci_rel(np.sort(samples)) <= cfg.rel_tol
    half = len(samples) // 2
    return min(samples[:half]) <= min(samples) * (1 + cfg.rel_tol)


@contextlib.contextmanager
def _quiet_gc() -> Iterator[None]:
    # A collection in the middle of a timed call is noise, not latency.
    # (No gc.collect() first: with torch loaded it takes up to a tenth of a second,
    # more than timing a small conv.)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_FLUSH: dict[int, np.ndarray] = {}


def default_flush_mb() -> float:
    """Twice the L2 cache of one core (Linux sysfs; 2 MB where it cannot be read)."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in sorted(base.glob("index*")):
            if (d / "level").read_text().strip() == "2":
                size = (d / "size").read_text().strip().upper()
                mult = {"K": 1 / 1024, "M": 1.0, "G": 1024.0}.get(size[-1], 1 / 2**20)
                return 2 * float(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return 2.0


def _flusher(mb: float) -> Callable[[], None]:
    """A function that evicts the core's private caches by writing ``mb`` MB (no-op
    for 0). A layer timed alone would find its weights and input hot in them from its
    own previous call; inside a network its weights were last used a whole network
    ago and its input was written by the layer before. Evicting the private caches
    (not all of L3) is the middle ground measured best here (docs/benchmarks.md)."""
    if mb is None:
        mb = default_flush_mb()
    if mb <= 0:
        return lambda: None
    n = int(mb * 2**20) // 4
    buf = _FLUSH.get(n)
    if buf is None:
        buf = _FLUSH[n] = np.zeros(n, dtype=np.float32)
    state = [0.0]

    def flush() -> None:
        state[0] += 1.0
        buf.fill(state[0])

    return flush


def measure(
    run: Callable[[], Any],
    config: TimingConfig | None = None,
    clock: Callable[[], float] | None = None,
) -> Measurement:
    """Time ``run`` (one synchronous call of a prepared model) under ``config``.

    ``clock`` (seconds) times the calls, default the wall clock; warm-up and time
    caps always run on the wall clock (see :attr:`Backend.clock`)."""
    cfg = config or TimingConfig()
    wall = time.perf_counter
    clock = clock or wall
    with _quiet_gc():
        t0 = wall()
        warm = 0
        while True:
            run()
            warm += 1
            if cfg.fixed:
                if warm >= cfg.warmup_runs:
                    break
            elif warm >= cfg.warmup_runs or (
                warm >= cfg.min_warmup_runs and wall() - t0 >= cfg.warmup_s
            ):
                break
        samples: list[float] = []
        t1 = wall()
        check_at = cfg.min_runs
        stopped = "fixed" if cfg.fixed else "max_runs"
        flush = _flusher(cfg.flush_mb)
        while len(samples) < cfg.max_runs:
            flush()
            a = clock()
            run()
            b = clock()
            samples.append((b - a) * 1e3)
            if cfg.fixed:
                continue
            n = len(samples)
            if wall() - t1 >= cfg.max_time_s and n >= cfg.min_runs_capped:
                stopped = "time"
                break
            if n >= check_at:
                if _stable(samples, cfg):
                    stopped = "stable"
                    break
                # checking costs a sort; a geometric schedule keeps it negligible
                check_at = n + max(2, n // 8)
        elapsed = wall() - t0
    return Measurement.from_samples(samples, warm, elapsed, stopped)


def measure_interleaved(
    runs: Mapping[str, Callable[[], Any]],
    *,
    rounds: int = 10,
    calls_per_round: int = 3,
    warmup_s: float = 0.2,
    max_time_s: float | None = None,
    clock: Callable[[], float] | None = None,
    warmup_calls: int = 2,
    settle_calls: int = 1,
) -> dict[str, Measurement]:
    """Time several things against each other: in each round every one runs
    ``calls_per_round`` times, the order alternating between rounds (ABBA), so
    slow drifts of the machine hit all of them alike. Statistics are over all
    timed calls. ``max_time_s`` (wall clock) stops early, after at least two
    rounds; ``clock`` times the calls (default: the wall clock). Each runs at
    least ``warmup_calls`` times (and ``warmup_s``) before timing, and
    ``settle_calls`` untimed times at the start of each turn (long calls such as
    whole sampling runs need neither)."""
    names = list(runs)
    samples: dict[str, list[float]] = {n: [] for n in names}
    wall = time.perf_counter
    clock = clock or wall
    with _quiet_gc():
        for name in names:
            t = wall()
            k = 0
            while k < warmup_calls or (warmup_calls and wall() - t < warmup_s):
                runs[name]()
                k += 1
        t0 = wall()
        done_rounds = 0
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                fn = runs[name]
                # one untimed call per turn: the previous network evicted this one's
                # weights from the caches, which a network run on its own would not see
                for _ in range(settle_calls):
                    fn()
                for _ in range(calls_per_round):
                    a = clock()
                    fn()
                    samples[name].append((clock() - a) * 1e3)
            done_rounds += 1
            if max_time_s is not None and done_rounds >= 2 and wall() - t0 >= max_time_s:
                break
        elapsed = wall() - t0
    return {
        n: Measurement.from_samples(samples[n], 0, elapsed, f"{done_rounds} rounds") for n in names
    }


# ---------------------------------------------------------------------------
# backends


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
        inputs and returns when the result is ready (device synchronised)."""
        raise NotImplementedError

    def meta(self) -> dict[str, Any]:
        """The settings to record with every measurement made with this backend."""
        raise NotImplementedError

    def prepare_entry(
        self, module: nn.Module, input_shape: Sequence[int], statistic: str = "min"
    ) -> tuple[Callable[[], Any], float]:
        """Like :meth:`prepare`, for a layer timed on its own: also returns the time
        (ms) one call spends on work that the same layer inside a network does not
        do, such as layout conversions at the model's input and output."""
        return self.prepare(module, input_shape), 0.0

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Context held around measurements (no autograd bookkeeping for torch)."""
        yield

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
        torch.set_num_threads(settings.threads)

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
        x = self.example(input_shape).to(self.device)
        if self.device.type == "cuda":
            sync = self._sync

            def run() -> None:
                m(x)
                sync()

            return run
        return lambda: m(x)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with torch.inference_mode():
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


_PROFILED_CALLS = 4
# Layout conversions ONNX Runtime inserts around a model's convs (CPU provider).
_LAYOUT_OPS = frozenset({"ReorderInput", "ReorderOutput"})


def _layout_ms(profile_file: str, statistic: str) -> float:
    """Per call, the time of the layout-conversion nodes in an ONNX Runtime profile
    (first call left out: it includes one-off allocations)."""
    import json

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
        torch.set_num_threads(settings.threads)
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

    def _export(self, module: nn.Module, x: torch.Tensor, exporter: str) -> bytes:
        with warnings.catch_warnings():
            # The legacy exporter announces its deprecation on every call.
            warnings.simplefilter("ignore")
            if exporter == "legacy":
                buf = io.BytesIO()
                torch.onnx.export(
                    module,
                    (x,),
                    buf,
                    dynamo=False,
                    input_names=["x"],
                    output_names=["y"],
                    opset_version=17,
                )
                return buf.getvalue()
            with contextlib.redirect_stdout(io.StringIO()):
                prog = torch.onnx.export(module, (x,), dynamo=True, verbose=False)
            return prog.model_proto.SerializeToString()

    def export(self, module: nn.Module, input_shape: Sequence[int]) -> bytes:
        """``module`` as an ONNX model for this backend's batch size and dtype."""
        m = copy.deepcopy(module).eval().to(dtype=self.torch_dtype)
        x = self.example(input_shape)
        with torch.no_grad():
            return self._export(m, x, self.exporter)

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
        self, module: nn.Module, input_shape: Sequence[int], statistic: str = "min"
    ) -> tuple[Callable[[], Any], float]:
        """On the CPU provider a conv alone runs as ReorderInput -> Conv (blocked NCHWc
        layout) -> ReorderOutput; inside a network the layout stays blocked from conv
        to conv, so the two reorders are not part of the conv's cost there. Their time
        is read from ONNX Runtime's profiler over the first calls (which double as
        warm-up); profiling is then switched off for the timed calls."""
        prefix = os.path.join(tempfile.gettempdir(), f"layermerge-prof-{os.getpid()}")
        run = self._prepare(module, input_shape, prefix)
        for _ in range(_PROFILED_CALLS):
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
        x = self.example(input_shape).numpy()
        binding = sess.io_binding()
        xv = self.ort.OrtValue.ortvalue_from_numpy(x, self.io_device, self.device_id)
        binding.bind_ortvalue_input(sess.get_inputs()[0].name, xv)
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


# ---------------------------------------------------------------------------
# what a table entry times


def end_activation(traced: TracedModel, block: PlanBlock) -> nn.Module | None:
    """The activation the deploy network applies at the end of ``block``: the end
    node's own one, or, for a linear end node of a block spanning two or more
    convs, the network's activation (as :func:`layermerge.transform.apply` does)."""
    if not block.activation:
        return None
    chain = traced.chain
    info = traced.info[block.end]
    if info.act is not None or info.unit.act_in_bn is not None:
        return _activation_module(traced, chain.nodes[block.end].activation, info.act_proto)
    if block.length > 1 and chain.activation:
        return _activation_module(traced, chain.activation, None)
    return None


def _activation_module(traced: TracedModel, name: str | None, proto: nn.Module | None):
    if proto is not None:
        return copy.deepcopy(proto)
    # the network's own module (with its inplace flag, slope, ...) where there is one
    for i, info in traced.info.items():
        if info.act_proto is not None and traced.chain.nodes[i].activation == name:
            return copy.deepcopy(info.act_proto)
    return make_activation(name)


def option_conv(chain: Chain, option: PlanBlock) -> nn.Conv2d:
    """The conv an option merges into (random weights: latency does not depend on them)."""
    c_in = chain.nodes[option.start].shape[0]
    c_out = chain.conv(option.end).out_channels
    kernel, stride, pad = merged_geometry(chain, option.kept_convs)
    if (kernel, stride) != (option.kernel, option.stride):
        raise PlanError(
            f"option {format_key(option.key)}: its kept convs {list(option.kept_convs)} merge "
            f"into kernel {kernel}, stride {stride}"
        )
    groups = c_in if option.depthwise and c_in == c_out else 1
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=pad, groups=groups, bias=True)


def option_module(traced: TracedModel, option: PlanBlock) -> nn.Module:
    """Merged conv + end activation of ``option``, as in the deploy network
    (an empty option, allowed by some model families, is the identity)."""
    if getattr(traced, "adapter", None) == "unet":
        from . import unet

        return unet.option_module(traced, option)
    if not option.kept_convs:
        return nn.Identity()
    conv = option_conv(traced.chain, option)
    act = end_activation(traced, option)
    return conv if act is None else nn.Sequential(conv, act)


def option_input_shape(chain: Chain, option: PlanBlock) -> tuple[int, ...]:
    """(C, H, W) the option's conv reads: the real shape at its start node."""
    return tuple(chain.nodes[option.start].shape)


def deploy_network(traced: TracedModel, plan: Plan, *, verify: bool = True) -> nn.Module:
    """The merged (deploy) network of ``plan``; the identity plan gives the original
    network with BatchNorm folded, the fair baseline."""
    from .transform import apply, merge

    net = merge(apply(traced, plan), verify=verify)
    if getattr(traced, "adapter", None) == "unet":
        from .unet import UNetForward

        return UNetForward(net, traced.timestep)  # one input (x) at a fixed timestep
    return net


# ---------------------------------------------------------------------------
# the latency table


def _row_of(
    option: PlanBlock,
    conv: nn.Module,
    act: str | None,
    shape: Sequence[int],
    m: Measurement | None,
    statistic: str,
    overhead_ms: float,
    layout_ms: float,
    run_id: str,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "start": option.start,
        "end": option.end,
        "kernel": option.kernel,
        "stride": option.stride,
        "depthwise": option.depthwise,
        "kept_convs": option.kept_convs,
        "activation": act or "",
        "input_shape": "x".join(map(str, shape)),
        "run": run_id,
    }
    if isinstance(conv, nn.Conv2d):
        row.update(
            in_channels=conv.in_channels,
            out_channels=conv.out_channels,
            padding=conv.padding[0],
            groups=conv.groups,
        )
    if m is None:  # an identity option costs nothing
        row.update(latency_ms=0.0, runs=0, warmup_runs=0, stopped="empty")
        return row
    row.update(
        latency_ms=max(m.value(statistic) - overhead_ms - layout_ms, 0.0),
        median_ms=m.median_ms,
        min_ms=m.min_ms,
        layout_ms=layout_ms,
        p25_ms=m.p25_ms,
        p75_ms=m.p75_ms,
        ci_rel=m.ci_rel,
        runs=m.runs,
        warmup_runs=m.warmup_runs,
        stopped=m.stopped,
        elapsed_s=round(m.elapsed_s, 4),
    )
    return row


def _progress(total: int, initial: int, enabled: bool | None, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled:
        return contextlib.nullcontext(None)
    return tqdm(total=total, initial=initial, desc=desc, unit="entry", file=sys.stderr)


def table_meta(
    traced: TracedModel, backend: Backend, timing: TimingConfig, model: str | None = None
) -> dict[str, Any]:
    """The sidecar of a latency table: the model, the backend settings, the protocol."""
    chain = traced.chain
    from . import __version__

    return {
        "model": model,
        "model_fingerprint": chain.fingerprint(),
        "chain_length": chain.length,
        "input_shape": list(chain.input_shape),
        **backend.meta(),
        "timing": timing.describe(),
        "statistic": timing.statistic,
        "layermerge_version": __version__,
    }


def build_latency_table(
    traced: TracedModel,
    out: str | Path,
    backend: Backend,
    *,
    space: SearchSpace | None = None,
    timing: TimingConfig | None = None,
    model: str | None = None,
    constant: bool = True,
    subtract_overhead: bool = True,
    progress: bool | None = None,
    max_entries: int | None = None,
) -> Table:
    """Measure every option of ``space`` (default: the model's whole search space)
    and write the table to ``out`` (CSV + sidecar), one durable row per entry.

    An existing file with the same settings is resumed: entries already in it are
    not measured again. ``constant`` then measures the rest of the network (see
    the module docstring) and stores ``constant_ms``; ``max_entries`` stops after
    that many new entries (the table stays resumable). Returns the table read back.
    """
    timing = timing or TimingConfig()
    space = space or build_space(traced.chain)
    out = Path(out)
    meta = table_meta(traced, backend, timing, model)
    meta["overhead_subtracted"] = subtract_overhead
    # not all digits or digits-e-digits, which the table would read back as a number
    run_id = "r" + uuid.uuid4().hex[:8]
    t_start = time.perf_counter()
    with TableWriter(out, "latency", meta, LATENCY_COLUMNS) as writer:
        todo = [o for o in space.options if o.key not in writer.done]
        unknown = writer.done - {o.key for o in space.options}
        if unknown:
            raise TableError(
                f"{out} holds {len(unknown)} entries that are not options of this model "
                f"(e.g. {format_key(sorted(unknown)[0])}); use a new file"
            )
        if max_entries is not None:
            todo = todo[:max_entries]
        overhead_ms = 0.0
        if subtract_overhead:
            overhead_ms = _overhead(writer, backend, timing)
        sampler = None
        if constant and todo and "constant_ms" not in writer.meta:
            sampler = _IdentitySampler(traced, backend, space, writer)
        done_before = len(writer.done)
        with (
            _progress(len(space.options), done_before, progress, "latency table") as bar,
            backend.session(),
        ):
            for option in todo:
                module = option_module(traced, option)
                shape = option_input_shape(traced.chain, option)
                act = None
                if isinstance(module, nn.Sequential):
                    act = type(module[1]).__name__.lower()
                conv = module[0] if isinstance(module, nn.Sequential) else module
                m, layout_ms = None, 0.0
                if option.kept_convs:
                    try:
                        run, layout_ms = backend.prepare_entry(module, shape, timing.statistic)
                        m = measure(run, timing, backend.clock)
                    except BackendError:
                        raise
                    except Exception as e:
                        raise RuntimeError(
                            f"measuring option {format_key(option.key)} (conv {conv}) failed: "
                            f"{type(e).__name__}: {e}"
                        ) from e
                    del run
                if sampler is not None:
                    sampler.maybe_sample()
                writer.write(
                    _row_of(
                        option,
                        conv,
                        act,
                        shape,
                        m,
                        timing.statistic,
                        overhead_ms,
                        layout_ms,
                        run_id,
                    )
                )
                if bar is not None:
                    bar.update(1)
        complete = len(writer.done) == len(space.options)
        elapsed = time.perf_counter() - t_start
        writer.update_meta(
            complete=complete,
            updated=time.strftime("%Y-%m-%dT%H:%M:%S"),
            elapsed_s=round(elapsed + float(writer.meta.get("elapsed_s", 0) or 0), 3),
        )
        if sampler is not None:
            sampler.save()
        if constant and complete and "constant_ms" not in writer.meta:
            rows = read_table(out, "latency")
            earlier = list(writer.meta.get("identity_samples_ms") or [])
            writer.update_meta(
                **measure_constant(
                    traced,
                    backend,
                    rows,
                    space=space,
                    timing=_constant_timing(timing),
                    samples_ms=earlier,
                    runner=sampler.run if sampler is not None else None,
                )
            )
    return read_table(out, "latency")


class _IdentitySampler:
    """Times the BN-folded original now and then while the entries are measured.

    The constant is the original's time minus its entries, so the two must see
    the same machine. On a shared machine the load of other jobs changes over
    minutes; timing the original only at the end would compare entries and
    network under different loads. Single calls spread over the whole build (about
    a tenth of its time), pooled with a final burst, see the same mix of load as
    the entries. The samples are kept in the sidecar, so a resumed build keeps them.
    """

    def __init__(self, traced: TracedModel, backend: Backend, space: SearchSpace, writer):
        self.writer = writer
        self.run = backend.prepare(
            deploy_network(traced, space.identity_plan()), traced.chain.input_shape
        )
        self.samples = list(writer.meta.get("identity_samples_ms") or [])
        self.clock = backend.clock
        t = time.perf_counter()
        self.run()  # first call: allocations, not a sample
        self.interval = max(0.25, 20 * (time.perf_counter() - t))
        self.last = time.perf_counter()
        self.unsaved = 0

    def maybe_sample(self) -> None:
        if time.perf_counter() - self.last < self.interval:
            return
        # the entries just measured pushed the network out of the caches, which a
        # network run back to back would not see: one call to bring it back first
        self.run()
        a = self.clock()
        self.run()
        b = self.clock()
        self.samples.append(round((b - a) * 1e3, 6))
        self.last = time.perf_counter()
        self.unsaved += 1
        if self.unsaved >= 10:
            self.save()

    def save(self) -> None:
        if self.unsaved:
            self.writer.update_meta(identity_samples_ms=self.samples)
            self.unsaved = 0


def _constant_timing(timing: TimingConfig) -> TimingConfig:
    # Every prediction contains the constant, so it gets a tighter interval and a
    # longer cap than a single entry (the fixed protocol stays fixed).
    if timing.fixed:
        return timing
    return replace(
        timing,
        min_runs=max(timing.min_runs, 30),
        rel_tol=min(timing.rel_tol, 0.01),
        max_time_s=timing.max_time_s * 20,
    )


def _overhead(writer: TableWriter, backend: Backend, timing: TimingConfig) -> float:
    """The per-call overhead of this table: measured once, kept in the sidecar so
    that a resumed build subtracts the same amount from its entries."""
    if "call_overhead_ms" in writer.meta:
        return float(writer.meta["call_overhead_ms"])
    value = backend.call_overhead(timing).value(timing.statistic)
    writer.update_meta(call_overhead_ms=value)
    return value


def measure_constant(
    traced: TracedModel,
    backend: Backend,
    table: Table,
    *,
    space: SearchSpace | None = None,
    timing: TimingConfig | None = None,
    samples_ms: Sequence[float] = (),
    runner: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """``constant_ms``: the latency of the network outside the chain's convs.

    Times the BN-folded identity-plan network and subtracts the table's entries
    for its blocks (each conv with its activation); see the module docstring for
    what this does and does not capture. ``samples_ms``, calls of the same network
    timed earlier (spread over the table's build), are pooled with this burst.
    Returns the values for the sidecar.
    """
    space = space or build_space(traced.chain)
    identity = space.identity_plan()
    if runner is None:
        runner = backend.prepare(deploy_network(traced, identity), traced.chain.input_shape)
    timing = timing or _constant_timing(TimingConfig(statistic=table_statistic(table)))
    with backend.session():
        m = measure(runner, timing, backend.clock)
    pooled = Measurement.from_samples(
        list(samples_ms) + list(m.samples_ms), m.warmup_runs, m.elapsed_s, m.stopped
    )
    value = pooled.value(timing.statistic)
    entries = sum(table.row(b.key)["latency_ms"] for b in identity.blocks)
    return {
        "constant_ms": value - entries,
        "constant_method": "identity network - sum of its entries",
        "identity_ms": value,
        "identity_median_ms": pooled.median_ms,
        "identity_entries_ms": entries,
        "identity_runs": pooled.runs,
        "identity_spread_runs": len(samples_ms),
    }


# ---------------------------------------------------------------------------
# using tables


def table_statistic(table: Table) -> str:
    """The statistic a table's entries are (``median`` for tables that do not say)."""
    return str(table.meta.get("statistic") or "median")


def _settings_table(meta: Mapping[str, Any], like: Table, name: str) -> Table:
    return Table(like.kind, like.columns, [], {**like.meta, **meta}, source=name)


def check_settings(
    table: Table, settings: Mapping[str, Any], what: str = "this measurement"
) -> None:
    """Refuse to use ``table`` with latencies measured under other ``settings``
    (a backend's :meth:`Backend.meta`, or a plan's recorded settings)."""
    keys = [k for k in SETTINGS_KEYS if k in table.meta or k in settings]
    check_same_settings(table, _settings_table(settings, table, what), keys)


def read_latency_tables(paths: Sequence[str | Path]) -> Table:
    """One latency table from one file or several shards; shards measured under
    different settings (:data:`SETTINGS_KEYS`) are refused."""
    tables = [read_table(p, "latency") for p in paths]
    for t in tables[1:]:
        check_same_settings(tables[0], t, SETTINGS_KEYS)
    return concat_tables(tables)


def predict_latency(table: Table, plan: Plan) -> float:
    """``constant_ms`` + the entries of the plan's blocks (identity blocks are free).

    Refuses a plan made for another model, and a plan solved with a latency table
    measured under other settings than ``table``.
    """
    check_plan_for_chain(plan, table.model_fingerprint, table.chain_length)
    recorded = plan.meta.get("latency_settings")
    if recorded:
        keys = [k for k in LATENCY_SETTINGS if k in recorded]
        check_same_settings(
            table, _settings_table(recorded, table, "the table the plan was solved with"), keys
        )
    total = table.constant_ms
    for b in plan.blocks:
        if not b.kept_convs:
            continue
        try:
            total += table.row(b.key)["latency_ms"]
        except KeyError:
            raise TableError(
                f"{table.name} has no entry for the plan's block {format_key(b.key)}; "
                "measure the whole search space"
            ) from None
    return total


# ---------------------------------------------------------------------------
# end-to-end benchmark


@dataclass
class BenchmarkResult:
    baseline_ms: float
    compressed_ms: float | None
    speedup: float | None
    predicted_ms: float | None
    predicted_baseline_ms: float | None
    baseline: Measurement
    compressed: Measurement | None
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "baseline_ms": self.baseline_ms,
            "compressed_ms": self.compressed_ms,
            "speedup": self.speedup,
            "predicted_ms": self.predicted_ms,
            "predicted_baseline_ms": self.predicted_baseline_ms,
            "baseline": self.baseline.summary(),
            "compressed": self.compressed.summary() if self.compressed else None,
            "settings": self.settings,
        }
        d.update(self.extra)
        return d


def benchmark(
    traced: TracedModel,
    plan: Plan | None,
    backend: Backend,
    *,
    table: Table | None = None,
    rounds: int = 10,
    calls_per_round: int = 5,
    max_time_s: float | None = 60.0,
    statistic: str | None = None,
) -> BenchmarkResult:
    """Time the original network with BatchNorm folded and, given a plan, its merged
    network, interleaved (:func:`measure_interleaved`). ``table`` adds the predicted
    latencies, after checking that it was measured with this backend's settings.
    ``statistic`` (default: the table's, else min) summarises the calls."""
    space = build_space(traced.chain)
    if statistic is None:
        statistic = table_statistic(table) if table is not None else TimingConfig().statistic
    settings = {**backend.meta(), "statistic": statistic}
    if table is not None:
        if table.model_fingerprint != space.fingerprint:
            raise TableError(
                f"{table.name} was measured for the model with fingerprint "
                f"{table.model_fingerprint}, this model has {space.fingerprint}"
            )
        check_settings(table, settings, "this benchmark")
    shape = traced.chain.input_shape
    runs = {"baseline": backend.prepare(deploy_network(traced, space.identity_plan()), shape)}
    if plan is not None:
        space.check_plan(plan)
        runs["compressed"] = backend.prepare(deploy_network(traced, plan), shape)
    with backend.session():
        res = measure_interleaved(
            runs,
            rounds=rounds,
            calls_per_round=calls_per_round,
            max_time_s=max_time_s,
            clock=backend.clock,
        )
    base = res["baseline"]
    comp = res.get("compressed")
    pred = pred_base = None
    if table is not None:
        pred_base = predict_latency(table, space.identity_plan())
        if plan is not None:
            pred = predict_latency(table, plan)
    b = base.value(statistic)
    c = comp.value(statistic) if comp else None
    return BenchmarkResult(
        baseline_ms=b,
        compressed_ms=c,
        speedup=b / c if c else None,
        predicted_ms=pred,
        predicted_baseline_ms=pred_base,
        baseline=base,
        compressed=comp,
        settings=settings,
        extra={"input_shape": list(shape), "pid": os.getpid()},
    )


# ---------------------------------------------------------------------------
# diffusion: the whole sampling loop


class _UNetEps(nn.Module):
    """``(x, t) -> unet(x, t).sample``: a UNet as a two-input module for export."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = self.unet(x, t)
        return y.sample if hasattr(y, "sample") else y


def unet_eps_function(
    backend: Backend, unet: nn.Module, input_shape: Sequence[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The noise prediction ``eps(x, t)`` of ``unet`` run by ``backend`` (its device,
    dtype, threads, providers), at the backend's batch size."""
    m = _UNetEps(copy.deepcopy(unet)).eval().to(dtype=backend.torch_dtype)
    for p in m.parameters():
        p.requires_grad_(False)
    if isinstance(backend, TorchBackend):
        m = m.to(backend.device)
        if backend.settings.compile:
            m = torch.compile(m, dynamic=False)
        device, dtype = backend.device, backend.torch_dtype

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return m(x.to(device, dtype), t.to(device))

        return eps
    assert isinstance(backend, OnnxRuntimeBackend)
    x = backend.example(input_shape)
    t = torch.zeros(x.shape[0], dtype=torch.long)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            prog = torch.onnx.export(m, (x, t), dynamo=True, verbose=False)
    opts = list(backend.settings.provider_options) if backend.settings.provider_options else None
    sess = backend.ort.InferenceSession(
        prog.model_proto.SerializeToString(),
        backend.session_options(),
        providers=list(backend.providers),
        provider_options=opts,
    )
    names = [i.name for i in sess.get_inputs()]
    np_dtype = x.numpy().dtype

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        feeds = {names[0]: x.cpu().numpy().astype(np_dtype, copy=False)}
        if len(names) > 1:  # an exporter may drop an input the graph does not use
            feeds[names[1]] = t.cpu().numpy().astype(np.int64, copy=False)
        return torch.from_numpy(sess.run(None, feeds)[0])

    return eps


def sampling_runner(
    backend: Backend,
    unet: nn.Module,
    input_shape: Sequence[int],
    *,
    steps: int = 100,
    eta: float = 0.0,
    seed: int = 0,
    scheduler_config: Mapping[str, Any] | None = None,
) -> Callable[[], torch.Tensor]:
    """A call that runs DDIM sampling (``steps`` UNet evaluations plus the scheduler's
    updates) from fixed initial noise, at the backend's batch size, and returns the
    images. The UNet runs on ``backend``; the scheduler's arithmetic on the CPU in
    PyTorch, as in a diffusers pipeline."""
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    eps = unet_eps_function(backend, unet, input_shape)
    sched = DDIMScheduler(**dict(scheduler_config or {}))
    sched.set_timesteps(steps)
    b = backend.settings.batch_size
    x0 = torch.randn(b, *input_shape, generator=torch.Generator().manual_seed(seed))

    def run() -> torch.Tensor:
        x = x0
        for t in sched.timesteps:
            e = eps(x, t.expand(b)).to(device=x.device, dtype=x.dtype)
            x = sched.step(e, t, x, eta=eta).prev_sample
        return x

    return run


def benchmark_sampling(
    traced,
    plan: Plan | None,
    backend: Backend,
    *,
    steps: int = 100,
    eta: float = 0.0,
    rounds: int = 3,
    max_time_s: float | None = 600.0,
    statistic: str = "min",
    scheduler_config: Mapping[str, Any] | None = None,
) -> BenchmarkResult:
    """Time whole DDIM sampling runs of the original UNet and, given a plan, of its
    merged UNet, interleaved, one run per network and round."""
    from .transform import apply, merge

    if getattr(traced, "adapter", None) != "unet":
        raise ValueError("sampling benchmarks need a diffusion UNet (diffusers UNet2DModel)")
    space = build_space(traced.chain)
    shape = traced.chain.input_shape
    nets = {"baseline": space.identity_plan()}
    if plan is not None:
        space.check_plan(plan)
        nets["compressed"] = plan
    runs = {
        k: sampling_runner(
            backend,
            merge(apply(traced, p)),
            shape,
            steps=steps,
            eta=eta,
            scheduler_config=scheduler_config,
        )
        for k, p in nets.items()
    }
    with backend.session():
        res = measure_interleaved(
            runs,
            rounds=rounds,
            calls_per_round=1,
            max_time_s=max_time_s,
            clock=backend.clock,
            warmup_calls=1,
            settle_calls=0,
        )
    base = res["baseline"]
    comp = res.get("compressed")
    b = base.value(statistic)
    c = comp.value(statistic) if comp else None
    return BenchmarkResult(
        baseline_ms=b,
        compressed_ms=c,
        speedup=b / c if c else None,
        predicted_ms=None,
        predicted_baseline_ms=None,
        baseline=base,
        compressed=comp,
        settings={**backend.meta(), "statistic": statistic},
        extra={"input_shape": list(shape), "sampling_steps": steps, "eta": eta},
    )
