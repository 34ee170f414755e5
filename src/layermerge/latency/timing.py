"""Timing: how one latency is measured, and several against each other.

Protocol (:class:`TimingConfig`). Each thing is warmed up for a short time, then
timed call by call, and summarised by the minimum (default) or the median of its
calls. The minimum is the default because these machines share their cores:
whether another job runs beside a measurement moves a call's time by up to 1.5x
for minutes at a time, so medians of entries timed at different moments do not
add up, while the undisturbed time does. Timing stops when the statistic is
stable to ``rel_tol`` (minimum: the later half of the calls found nothing faster
than the earlier half by more than that; median: its distribution-free 95 %
confidence interval is that narrow), or at a time cap. Cheap, stable entries
finish after a few dozen calls; costly ones stop at the cap after a few calls,
which is where their statistic is already precise. The reference
implementation's fixed protocol (300 warm-up + 200 timed calls) is
:meth:`TimingConfig.reference`.

A layer timed back to back finds its weights and input hot in the caches from
its own previous call, which inside a network it never does: the core's private
caches are evicted before every timed call (``TimingConfig.flush_mb``, by default
twice the L2 size). :func:`measure_interleaved` times several things in
alternating order (ABBA), so that slow drifts of the machine hit all alike.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

STATISTICS = ("min", "median")


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
    flush_mb: float | None = None  # None: twice the core's L2 cache (see flusher)

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


def flusher(mb: float | None) -> Callable[[], None]:
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
        flush = flusher(cfg.flush_mb)
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
