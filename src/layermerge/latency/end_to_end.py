"""End-to-end benchmark: whole networks, original (BatchNorm folded) against merged,
timed interleaved on one backend, with the latency table's predictions beside them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..families import TracedModel
from ..plan import Plan
from ..space import build_space
from ..tables import Table, TableError
from .backends import Backend, BackendError, BackendSettings, make_backend
from .table import check_settings, deploy_network, predict_latency, table_statistic
from .timing import Measurement, TimingConfig, measure_interleaved


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """``(predicted - measured) / measured``: positive when the table over-predicts."""
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


@dataclass
class BenchmarkResult:
    """Measured latencies of the original (BN folded) and the merged network, and,
    with a latency table, the table's predictions beside them (``predicted_ms``,
    ``predicted_error``: relative error of the prediction, positive when the table
    over-predicts)."""

    baseline_ms: float
    compressed_ms: float | None
    speedup: float | None
    predicted_ms: float | None
    predicted_baseline_ms: float | None
    baseline: Measurement
    compressed: Measurement | None
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted_error(self) -> float | None:
        """Relative error of the merged network's prediction."""
        return relative_error(self.predicted_ms, self.compressed_ms)

    @property
    def predicted_baseline_error(self) -> float | None:
        """Relative error of the original's prediction (small by construction, up
        to the drift of the machine between the table's build and now)."""
        return relative_error(self.predicted_baseline_ms, self.baseline_ms)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "baseline_ms": self.baseline_ms,
            "compressed_ms": self.compressed_ms,
            "speedup": self.speedup,
            "predicted_ms": self.predicted_ms,
            "predicted_baseline_ms": self.predicted_baseline_ms,
            "predicted_error": self.predicted_error,
            "predicted_baseline_error": self.predicted_baseline_error,
            "baseline": self.baseline.summary(),
            "compressed": self.compressed.summary() if self.compressed else None,
            "settings": self.settings,
        }
        d.update(self.extra)
        return d


def _check_table_for(table: Table, space) -> None:
    """Refuse a latency table measured for another model than ``space``'s."""
    if table.model_fingerprint != space.fingerprint:
        raise TableError(
            f"{table.name} was measured for the model with fingerprint "
            f"{table.model_fingerprint}, this model has {space.fingerprint} (load and trace "
            "it as the table was built: the same input shape and stem/head options)"
        )


def _time_interleaved(
    traced: TracedModel,
    space,
    backend: Backend,
    plans: Mapping[str, Plan],
    rounds: int,
    calls_per_round: int,
    max_time_s: float | None,
) -> dict[str, Measurement]:
    """The deploy network of every plan, timed interleaved on ``backend``."""
    shape = traced.chain.input_shape
    runs = {}
    for label, plan in plans.items():
        space.check_plan(plan)
        runs[label] = backend.prepare(deploy_network(traced, plan), shape)
    with backend.session():
        return measure_interleaved(
            runs,
            rounds=rounds,
            calls_per_round=calls_per_round,
            max_time_s=max_time_s,
            clock=backend.clock,
        )


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
        _check_table_for(table, space)
        check_settings(table, settings, "this benchmark")
    todo = {"baseline": space.identity_plan()}
    if plan is not None:
        todo["compressed"] = plan
    res = _time_interleaved(traced, space, backend, todo, rounds, calls_per_round, max_time_s)
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
        extra={"input_shape": list(traced.chain.input_shape), "pid": os.getpid()},
    )


def backend_for_table(table: Table) -> Backend:
    """A backend with the settings ``table`` was measured under (its sidecar), so
    that networks are timed as its entries were."""
    m = table.meta
    name = str(m.get("backend") or "")
    if not name:
        raise TableError(f"{table.name} does not record the backend it was measured on")
    onnx = name.startswith("onnxruntime")
    try:
        return make_backend(
            BackendSettings(
                backend="onnxruntime" if onnx else "torch",
                device=str(m.get("device") or "cpu"),
                threads=int(m.get("threads") or 1),
                batch_size=int(m.get("batch_size") or 1),
                dtype=str(m.get("dtype") or "float32"),
                providers=(tuple(m.get("providers") or ()) or None) if onnx else None,
                compile=bool(m.get("compile")),
                exporter=str(m.get("exporter") or "auto"),
                clock=str(m.get("clock") or "auto"),
            )
        )
    except BackendError as e:
        raise BackendError(f"cannot time networks as {table.name} was measured: {e}") from None


@dataclass
class PlanTiming:
    """One network of :func:`measure_plans`: measured and predicted latency."""

    measured_ms: float
    predicted_ms: float
    measurement: Measurement

    @property
    def error(self) -> float | None:
        """Relative error of the prediction (positive: over-predicted)."""
        return relative_error(self.predicted_ms, self.measured_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "measured_ms": self.measured_ms,
            "predicted_ms": self.predicted_ms,
            "error": self.error,
            "calls": self.measurement.runs,
        }


def measure_plans(
    traced: TracedModel,
    plans: Mapping[str, Plan],
    table: Table,
    backend: Backend | None = None,
    *,
    rounds: int = 10,
    calls_per_round: int = 5,
    max_time_s: float | None = 60.0,
) -> dict[str, PlanTiming]:
    """Time the deploy network of every plan and the original (BatchNorm folded,
    key ``"unmodified"``) interleaved, on the backend ``table`` was measured with
    (default :func:`backend_for_table`), and put the table's prediction beside each
    measurement. The statistic is the table's."""
    space = build_space(traced.chain)
    _check_table_for(table, space)
    backend = backend or backend_for_table(table)
    statistic = table_statistic(table)
    check_settings(table, {**backend.meta(), "statistic": statistic}, "this measurement")
    todo = {"unmodified": space.identity_plan(), **plans}
    res = _time_interleaved(traced, space, backend, todo, rounds, calls_per_round, max_time_s)
    return {
        label: PlanTiming(
            measured_ms=res[label].value(statistic),
            predicted_ms=predict_latency(table, plan),
            measurement=res[label],
        )
        for label, plan in todo.items()
    }
