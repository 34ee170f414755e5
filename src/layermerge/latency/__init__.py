"""Latency: backends, the latency table and end-to-end benchmarks.

Four modules, each usable alone, each importing only the ones before it:

- :mod:`~layermerge.latency.timing`: how one latency is measured
  (:class:`TimingConfig`, :func:`measure`) and several against each other
  (:func:`measure_interleaved`).
- :mod:`~layermerge.latency.backends`: what runs a module on a fixed input,
  PyTorch eager (CPU or CUDA, optionally ``torch.compile``) or ONNX Runtime with
  any list of execution providers (:func:`make_backend`), and the settings every
  measurement records (:meth:`Backend.meta`).
- :mod:`~layermerge.latency.table`: the latency table, one entry per option of a
  model's search space plus the constant cost outside the chain
  (:func:`build_latency_table`), and the latency it predicts for a plan
  (:func:`predict_latency`).
- :mod:`~layermerge.latency.end_to_end`: whole networks, original (BatchNorm
  folded) against merged, timed interleaved (:func:`benchmark`).

The package knows nothing about particular kinds of models: what an option costs
and what network a plan deploys to come from the model's family
(:mod:`layermerge.families`). Timing whole diffusion sampling runs is in
:mod:`layermerge.sampling`.
"""

from __future__ import annotations

from ..ops import option_conv
from .backends import (
    BACKENDS,
    CLOCKS,
    DTYPES,
    EXPORTERS,
    Backend,
    BackendError,
    BackendSettings,
    OnnxRuntimeBackend,
    TorchBackend,
    make_backend,
)
from .end_to_end import BenchmarkResult, PlanTiming, backend_for_table, benchmark, measure_plans
from .table import (
    LATENCY_COLUMNS,
    LATENCY_MODEL,
    SETTINGS_KEYS,
    build_latency_table,
    check_latency_model,
    check_settings,
    deploy_network,
    measure_constant,
    option_input_shape,
    option_module,
    predict_latency,
    read_latency_tables,
    table_meta,
    table_statistic,
)
from .timing import (
    STATISTICS,
    Measurement,
    TimingConfig,
    default_flush_mb,
    measure,
    measure_interleaved,
)

__all__ = [
    "BACKENDS",
    "LATENCY_MODEL",
    "check_latency_model",
    "CLOCKS",
    "DTYPES",
    "EXPORTERS",
    "LATENCY_COLUMNS",
    "SETTINGS_KEYS",
    "STATISTICS",
    "Backend",
    "BackendError",
    "BackendSettings",
    "BenchmarkResult",
    "Measurement",
    "PlanTiming",
    "OnnxRuntimeBackend",
    "TimingConfig",
    "TorchBackend",
    "backend_for_table",
    "benchmark",
    "build_latency_table",
    "check_settings",
    "default_flush_mb",
    "deploy_network",
    "make_backend",
    "measure",
    "measure_constant",
    "measure_interleaved",
    "measure_plans",
    "option_conv",
    "option_input_shape",
    "option_module",
    "predict_latency",
    "read_latency_tables",
    "table_meta",
    "table_statistic",
]
