"""The problem the solvers share: choices per span (one kind per method), budgets,
and what a solve returns."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..costs import block_latency_ms
from ..fileio import atomic_write_text
from ..plan import Plan, PlanBlock
from ..tables import (
    KEPT_COLUMN,
    LATENCY_SETTINGS,
    Table,
    TableError,
    check_same_model,
    format_key,
    join_tables,
)

METHODS = ("layermerge", "kim23", "layerprune", "layermerge-drop")
SCORE_MODES = ("exp", "additive")
# A typical precision for an explicit discretised solve (units of 0.01 ms). The
# solver itself is exact unless a precision is given.
DEFAULT_PRECISION = 100.0
# Relative float-noise guard when converting ms to units: 1.1 * 100 is
# 110.00000000000001, which must round up to 110 units, not 111, and a budget of
# 0.29 * 100 = 28.999999999999996 is 29 units. A plan within the discretised budget
# can then exceed the real one by at most this fraction (twice), never more.
_UNIT_RTOL = 1e-9
# Most units one choice may take: sums over a chain stay exact in int64 and float64.
MAX_UNITS = 2**53
# Refuse DP tables larger than this many cells (about 1.2 GB with back-pointers).
MAX_DP_CELLS = 100_000_000
# Refuse an exact solve whose candidate partial plans at one node exceed this
# (the frontiers of real search spaces hold hundreds of points).
MAX_FRONTIER_CANDIDATES = 20_000_000


class InfeasibleBudgetError(ValueError):
    """No plan fits the budget; carries the smallest budget that would."""

    def __init__(
        self,
        method: str,
        budget_ms: float,
        min_feasible_ms: float,
        fastest_ms: float,
        precision: float | None,
    ) -> None:
        self.method = method
        self.budget_ms = budget_ms
        self.min_feasible_ms = min_feasible_ms
        self.fastest_ms = fastest_ms
        self.precision = precision
        if precision is None:
            message = (
                f"no {method} plan fits a latency budget of {budget_ms:.6g} ms: the fastest "
                f"plan takes {fastest_ms:.6g} ms; raise the budget"
            )
        else:
            message = (
                f"no {method} plan fits a latency budget of {budget_ms:.4f} ms: the smallest "
                f"feasible budget is {min_feasible_ms:.4f} ms (the fastest plan takes "
                f"{fastest_ms:.4f} ms before rounding latencies up to 1/{precision:g} ms); "
                "raise the budget, or solve exactly (no precision)"
            )
        super().__init__(message)


def to_units(latency_ms: np.ndarray | float, precision: float) -> np.ndarray:
    """Latencies in integer units of ``1/precision`` ms, rounded up; more than
    :data:`MAX_UNITS` units (which int64 sums could overflow) are refused."""
    x = np.ceil(np.asarray(latency_ms, dtype=np.float64) * precision * (1 - _UNIT_RTOL))
    if np.any(x > MAX_UNITS):
        worst = float(np.max(np.asarray(latency_ms, dtype=np.float64)))
        raise ValueError(_units_message(f"a latency of {worst:g} ms", precision))
    return np.maximum(x, 0).astype(np.int64)


def _units_message(what: str, precision: float) -> str:
    return (
        f"{what} is more than {MAX_UNITS:.3g} units of 1/{precision:g} ms, beyond what "
        "the discretised solver counts exactly; solve exactly (no precision) or lower "
        "the precision"
    )


def _check_units(table: Table, latency_ms: np.ndarray, precision: float | None) -> None:
    """Refuse (naming the row) latencies too large for a discretised solve."""
    if precision is None:
        return
    over = np.flatnonzero(latency_ms * precision > MAX_UNITS)
    if over.size:
        i = int(over[0])
        key = format_key(table.key_of(table.rows[i]))
        raise TableError(
            _units_message(
                f"{table.name}: option {key} has latency_ms {latency_ms[i]:g}; it", precision
            )
        )


def budget_to_units(chain_budget_ms: float, precision: float) -> int:
    """A budget in units, rounded down (so plans within it fit the real budget); one
    beyond every int64 sum of choices counts as ``2**62`` (its sign kept)."""
    x = chain_budget_ms * precision * (1 + _UNIT_RTOL)
    return (
        max(-(2**62), min(2**62, math.floor(x)))
        if math.isfinite(x)
        else int(math.copysign(2**62, x))
    )


def option_scores(table: Table, score: str = "exp") -> np.ndarray:
    """Per-row scores of an importance (or per-conv importance) table.

    ``exp``: the table's ``importance`` column, the paper's normalised importance
    (``exp(delta_acc/100)``, or ``exp(-val_loss_ratio)`` for diffusion).
    ``additive``: the raw additive value, ``delta_acc`` when present, else
    ``-val_loss_ratio``; sums of it are comparable to sums of accuracy changes,
    and unlike the exp score it does not reward plans for having more blocks.
    """
    if score == "exp":
        values = table.column("importance")
        bad = np.flatnonzero(~(values > 0))
        if bad.size:
            i = int(bad[0])
            key = table.key_of(table.rows[i])
            which = (
                f"conv {key}" if table.kind == "conv_importance" else "option " + format_key(key)
            )
            raise TableError(
                f"{table.name}: the importance of {which} is {float(values[i])!r}; the exp score needs "
                "importances > 0 (exp of the accuracy change): rebuild the table, or use "
                "--score additive"
            )
        return values
    if score == "additive":
        if table.has_column("delta_acc"):
            return table.column("delta_acc")
        if table.has_column("val_loss_ratio"):
            return -table.column("val_loss_ratio")
        raise TableError(
            f"{table.name}: the additive score needs a 'delta_acc' (classification) or "
            f"'val_loss_ratio' (diffusion) column, and this table has only "
            f"{', '.join(table.columns)}; use --score exp or rebuild the table with raw values"
        )
    raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORE_MODES)}")


def _all_kept(row: dict[str, Any]) -> bool:
    return row[KEPT_COLUMN] == tuple(range(row["start"] + 1, row["end"] + 1))


def _block(row: dict[str, Any], activation: bool = True) -> PlanBlock:
    return PlanBlock(
        start=row["start"],
        end=row["end"],
        kernel=row["kernel"],
        stride=row["stride"],
        depthwise=row["depthwise"],
        kept_convs=row[KEPT_COLUMN],
        activation=activation,
    )


def _single_conv_rows(latency: Table, purpose: str) -> list[dict[str, Any]]:
    """The option of each block ``(i-1, i)`` that keeps conv ``i``."""
    found: dict[int, dict[str, Any]] = {}
    for r in latency.rows:
        if r["end"] == r["start"] + 1 and r[KEPT_COLUMN] == (r["end"],):
            found[r["end"]] = r
    missing = [i for i in range(1, latency.chain_length + 1) if i not in found]
    if missing:
        shown = ", ".join(f"({i - 1}, {i})" for i in missing[:5])
        raise TableError(
            f"{latency.name}: no option keeping the conv of single-conv block(s) {shown}"
            f"{' and more' if len(missing) > 5 else ''}; {purpose} needs them: measure "
            "every block of the options table"
        )
    return [found[i] for i in range(1, latency.chain_length + 1)]


def base_latency_ms(latency: Table) -> float:
    """Latency of the unmodified network: every conv and activation kept, plus the constant."""
    rows = _single_conv_rows(latency, "the unmodified network's latency")
    return latency.constant_ms + float(sum(r["latency_ms"] for r in rows))


def resolve_budget(
    base_ms: float,
    *,
    budget_ms: float | None = None,
    budget_frac: float | None = None,
    speedup: float | None = None,
) -> float:
    """The budget in ms from exactly one of: ms, a fraction of ``base_ms``, a speed-up."""
    given = [
        (n, v)
        for n, v in (("budget_ms", budget_ms), ("budget_frac", budget_frac), ("speedup", speedup))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError("give exactly one of budget_ms, budget_frac and speedup")
    name, value = given[0]
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    if name == "budget_ms":
        return float(value)
    if name == "budget_frac":
        return base_ms * value
    return base_ms / value


# ---------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class Problem:
    """Choices of one method over a chain, ready for the DP.

    Choice ``k`` covers span ``(start[k], end[k]]``, costs ``latency_ms[k]``
    (``units[k]`` after rounding up, for a discretised problem) and scores
    ``score[k]``; applying it puts ``blocks[k]`` into the plan (several blocks
    for a kim23 span realised as consecutive merged convs). ``precision`` is
    ``None`` for an exact problem, which has no ``units``.
    """

    method: str
    model_fingerprint: str
    chain_length: int
    constant_ms: float
    base_latency_ms: float
    precision: float | None
    score_mode: str
    start: np.ndarray
    end: np.ndarray
    units: np.ndarray | None
    latency_ms: np.ndarray
    score: np.ndarray
    blocks: tuple[tuple[PlanBlock, ...], ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_choices(self) -> int:
        return len(self.blocks)

    @property
    def exact(self) -> bool:
        """Solved over real-valued latencies (no precision)."""
        return self.precision is None


def _check_precision(precision: float | None) -> None:
    if precision is not None and not (
        isinstance(precision, int | float) and math.isfinite(precision) and precision > 0
    ):
        raise ValueError(
            f"precision must be a positive number of units per ms (or None for an exact "
            f"solve), got {precision}"
        )


def _units(latency_ms: np.ndarray | float, precision: float | None) -> np.ndarray:
    """Rounded-up units, or zeros for an exact problem (units then play no part)."""
    if precision is None:
        return np.zeros(np.shape(latency_ms), dtype=np.int64)
    return to_units(latency_ms, precision)


def _problem(
    method: str,
    latency: Table,
    precision: float | None,
    score_mode: str,
    choices: Sequence[tuple[tuple[PlanBlock, ...], int, float, float]],
) -> Problem:
    """``choices``: (blocks, units, latency_ms, score), in any order."""
    _check_precision(precision)
    # The DP's tie rule relies on this order: by end, then longest span first.
    order = sorted(
        range(len(choices)),
        key=lambda i: (
            choices[i][0][-1].end,
            choices[i][0][0].start,
            [b.key for b in choices[i][0]],
            [b.kept_convs for b in choices[i][0]],
        ),
    )
    ch = [choices[i] for i in order]
    fastest = [math.inf] * (latency.chain_length + 1)
    fastest[0] = 0.0
    for blocks, _, ms, _ in ch:  # by end: the start's value is final
        s, e = blocks[0].start, blocks[-1].end
        fastest[e] = min(fastest[e], fastest[s] + ms)
    if latency.constant_ms + fastest[-1] < 0:
        raise TableError(
            f"{latency.name}: the fastest {method} plan would be predicted to take "
            f"{latency.constant_ms + fastest[-1]:.6g} ms (constant_ms {latency.constant_ms:.6g} "
            "+ its entries); the table is inconsistent: re-measure it"
        )
    return Problem(
        method=method,
        model_fingerprint=latency.model_fingerprint,
        chain_length=latency.chain_length,
        constant_ms=latency.constant_ms,
        base_latency_ms=base_latency_ms(latency),
        precision=None if precision is None else float(precision),
        score_mode=score_mode,
        start=np.array([c[0][0].start for c in ch], dtype=np.int64),
        end=np.array([c[0][-1].end for c in ch], dtype=np.int64),
        units=None if precision is None else np.array([c[1] for c in ch], dtype=np.int64),
        latency_ms=np.array([c[2] for c in ch], dtype=np.float64),
        score=np.array([c[3] for c in ch], dtype=np.float64),
        blocks=tuple(c[0] for c in ch),
        meta={k: latency.meta[k] for k in LATENCY_SETTINGS if k in latency.meta},
    )


def _layermerge_choices(
    latency: Table, importance: Table, score: str, precision: float | None
) -> tuple[Table, list[tuple[tuple[PlanBlock, ...], int, float, float]]]:
    """The joined latency table and one choice per option of every block."""
    lat, imp = join_tables(latency, importance)
    scores = option_scores(imp, score)
    _check_units(lat, lat.column("latency_ms"), precision)
    units = _units(lat.column("latency_ms"), precision)
    choices = [
        ((_block(r),), int(u), r["latency_ms"], float(sc))
        for r, u, sc in zip(lat.rows, units, scores)
    ]
    return lat, choices


def layermerge_problem(
    latency: Table,
    importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Every option of every block is a choice (keeping the importance table's convs)."""
    _check_precision(precision)
    lat, choices = _layermerge_choices(latency, importance, score, precision)
    return _problem("layermerge", lat, precision, score, choices)


def layermerge_drop_problem(
    latency: Table,
    importance: Table,
    conv_importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """LayerMerge's choices plus layer pruning's drops: the union of both spaces.

    Every choice of :func:`layermerge_problem`, and for every conv with a row in
    ``conv_importance`` the dropped single-conv block exactly as
    :func:`layerprune_problem` makes it (same latency, same score). LayerMerge's
    own space never offers a block's empty choice (all its convs pruned, the block
    an identity); with the drops, any plan of either method is a plan of this one.
    Its optimum is at least LayerMerge's, and at least layer pruning's where the
    importance table scores each unchanged single-conv option as layer pruning
    scores a kept conv (1 exp, 0 additive): here a kept conv scores the table's.
    """
    _check_conv_importance(latency, conv_importance)
    _check_precision(precision)
    lat, choices = _layermerge_choices(latency, importance, score, precision)
    choices += _drop_choices(latency, conv_importance, score, precision)
    return _problem("layermerge-drop", lat, precision, score, choices)


def kim23_problem(
    latency: Table,
    importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Activation removal only: all-kept options, spans realised at their cheapest.

    A span ``(s, e)`` with an all-kept option is one choice scored by that
    option's importance. With its inner activations gone it may run as one
    merged conv or as several consecutive merged convs (sub-blocks that are
    themselves blocks with an all-kept option): its cost is
    ``T_opt(s, e) = min(T(s, e), min_m T_opt(s, m) + T_opt(m, e))``, in ms for an
    exact problem; a discretised one takes it in units (the budget is in units),
    then in ms.
    """
    _check_precision(precision)
    lat, imp = join_tables(latency, importance)
    scores = option_scores(imp, score)
    _check_units(lat, lat.column("latency_ms"), precision)
    units = _units(lat.column("latency_ms"), precision)
    # an inner part of a realisation runs without its end activation: its entry without
    # it where the table has one (latency_noact_ms), else the entry itself
    noact_ms = [
        r["latency_ms"] if r.get("latency_noact_ms") is None else float(r["latency_noact_ms"])
        for r in lat.rows
    ]
    noact_units = _units(np.asarray(noact_ms), precision)
    by_span: dict[tuple[int, int], int] = {}
    for i, r in enumerate(lat.rows):
        if _all_kept(r):
            span = (r["start"], r["end"])
            if span in by_span:
                raise TableError(
                    f"{lat.name}: block {span} has two options keeping all its convs, "
                    f"{format_key(lat.key_of(lat.rows[by_span[span]]))} and "
                    f"{format_key(lat.key_of(r))}; the options table is inconsistent"
                )
            by_span[span] = i
    ends_at: dict[int, list[int]] = {}
    for s, e in by_span:
        ends_at.setdefault(e, []).append(s)
    L = lat.chain_length
    choices = []
    for s0 in sorted({s for s, _ in by_span}):
        # Cheapest activation-free realisation of (s0, e] for every e: a shortest
        # path from s0 over all-kept blocks without their end activation (inner
        # parts), cost (units, ms) compared in that order; the last part keeps its
        # activation, so a span's cost is min over m of best[m] + T(m, e).
        best: dict[int, tuple[int, float, int]] = {s0: (0, 0.0, -1)}
        last: dict[int, tuple[int, float, int]] = {}
        for e in range(s0 + 1, L + 1):
            for m in sorted(ends_at.get(e, ())):
                if m < s0 or m not in best:
                    continue
                i = by_span[(m, e)]
                inner = (best[m][0] + int(noact_units[i]), best[m][1] + noact_ms[i], m)
                if e not in best or inner[:2] < best[e][:2]:
                    best[e] = inner
                end = (best[m][0] + int(units[i]), best[m][1] + lat.rows[i]["latency_ms"], m)
                if e not in last or end[:2] < last[e][:2]:
                    last[e] = end
        for e in range(s0 + 1, L + 1):
            if (s0, e) not in by_span:
                continue
            parts = [(last[e][2], e)]
            node = last[e][2]
            while node != s0:
                m = best[node][2]
                parts.append((m, node))
                node = m
            parts.reverse()
            blocks = tuple(
                _block(lat.rows[by_span[p]], activation=j == len(parts) - 1)
                for j, p in enumerate(parts)
            )
            choices.append((blocks, last[e][0], last[e][1], float(scores[by_span[(s0, e)]])))
    return _problem("kim23", lat, precision, score, choices)


def _check_conv_importance(latency: Table, conv_importance: Table) -> None:
    if latency.kind != "latency":
        raise TableError(f"{latency.name} is a {latency.kind} table, not a latency table")
    if conv_importance.kind != "conv_importance":
        raise TableError(
            f"{conv_importance.name} is a {conv_importance.kind} table, not a per-conv "
            "importance (conv_importance) table"
        )
    check_same_model(latency, conv_importance)


def _drop_choices(
    latency: Table, conv_importance: Table, score: str, precision: float | None
) -> list[tuple[tuple[PlanBlock, ...], int, float, float]]:
    """Layer pruning's drops: for each conv ``i`` with a row in ``conv_importance``,
    the block ``(i-1, i)`` that keeps no conv, scored by the conv's importance.

    Its latency is what the dropped conv's node still computes (its residual add,
    its activation), priced as the latency prediction prices it
    (:func:`~layermerge.costs.block_latency_ms`: the block's empty option where the
    table has one, else ``dropped_ms``); tables measured before dropped convs had a
    cost charge nothing."""
    drop_score = dict(zip(conv_importance.keys(), option_scores(conv_importance, score)))
    choices = []
    for i in range(1, latency.chain_length + 1):
        if i not in drop_score:
            continue
        dropped = PlanBlock(i - 1, i, kernel=1, stride=1, depthwise=False, kept_convs=())
        d = block_latency_ms(latency, dropped, missing_dropped_ms=0.0)
        choices.append(((dropped,), int(_units(d, precision)), d, float(drop_score[i])))
    return choices


def layerprune_problem(
    latency: Table,
    conv_importance: Table,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """Layer pruning only: keep each conv (its single-conv latency) or drop it (what
    its node still costs: :func:`~layermerge.costs.block_latency_ms`, as the
    latency prediction prices it; 0 where the table has no such cost).

    Convs without a row in ``conv_importance`` are irreducible and always kept.
    A kept conv scores 1 (exp) or 0 (additive), the values of an unchanged network;
    a dropped conv scores its per-conv importance.
    """
    _check_conv_importance(latency, conv_importance)
    _check_precision(precision)
    keep_score = 1.0 if score == "exp" else 0.0
    singles = _single_conv_rows(latency, "layer pruning")
    if precision is not None:
        single = Table("latency", latency.columns, singles, latency.meta, latency.path)
        _check_units(single, single.column("latency_ms"), precision)
    choices = [
        ((_block(r),), int(_units(r["latency_ms"], precision)), r["latency_ms"], keep_score)
        for r in singles
    ]
    choices += _drop_choices(latency, conv_importance, score, precision)
    return _problem("layerprune", latency, precision, score, choices)


def build_problem(
    method: str,
    latency: Table,
    importance: Table | None = None,
    conv_importance: Table | None = None,
    *,
    score: str = "exp",
    precision: float | None = None,
) -> Problem:
    """The problem of ``method`` from its tables (see the four functions above).

    ``precision=None`` (the default) makes an exact problem; a number of units per
    ms makes a discretised one (faster to state, coarser: see the module docs)."""
    if score not in SCORE_MODES:
        raise ValueError(f"unknown score {score!r}; expected one of {', '.join(SCORE_MODES)}")
    if method == "layerprune":
        if conv_importance is None:
            raise TableError("the layerprune method needs a per-conv importance table")
        if importance is not None:
            check_same_model(latency, importance)
        return layerprune_problem(latency, conv_importance, score=score, precision=precision)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if importance is None:
        raise TableError(f"the {method} method needs an importance table")
    if method == "layermerge-drop":
        if conv_importance is None:
            raise TableError(
                "the layermerge-drop method needs a per-conv importance table as well as "
                "the importance table (its drops are scored by the per-conv table)"
            )
        return layermerge_drop_problem(
            latency, importance, conv_importance, score=score, precision=precision
        )
    make = layermerge_problem if method == "layermerge" else kim23_problem
    return make(latency, importance, score=score, precision=precision)


# ---------------------------------------------------------------------------
# the dynamic program


@dataclass(frozen=True)
class Frontier:
    """The trade-off curve: for each budget, the best score and the predicted latency
    of the plan returned at that budget. An exact solve lists the curve's breakpoints
    (the budgets at which the best score goes up: the latencies of the non-dominated
    plans, constant part included; the curve is flat between them); a discretised
    one lists every latency unit."""

    budget_ms: np.ndarray
    objective: np.ndarray  # -inf where no plan fits
    latency_ms: np.ndarray  # nan where no plan fits
    tolerance: float = 0.0

    def steps(self) -> Frontier:
        """Only the budgets at which the best score goes up (the curve is flat between)."""
        prev = np.concatenate(([-np.inf], self.objective[:-1]))
        keep = np.isfinite(self.objective) & (self.objective - self.tolerance > prev)
        return Frontier(
            self.budget_ms[keep], self.objective[keep], self.latency_ms[keep], self.tolerance
        )

    def write_csv(self, path: str | Path) -> Path:
        """The steps of the curve as CSV: budget_ms, objective, latency_ms."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        st = self.steps()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["budget_ms", "objective", "latency_ms"])
        for b, o, lat in zip(st.budget_ms.tolist(), st.objective.tolist(), st.latency_ms.tolist()):
            w.writerow([f"{b:.6f}", repr(o), f"{lat:.6f}"])
        return atomic_write_text(path, buf.getvalue())


@dataclass
class Solution:
    """The result of one solve: the plan at the budget and the curve below it.

    ``budget_units`` is ``None`` for an exact solve. :meth:`plan_at` reads the plan
    for any smaller budget from the same pass.
    """

    problem: Problem
    budget_ms: float
    budget_units: int | None
    objective: float
    predicted_latency_ms: float
    plan: Plan
    frontier: Frontier
    #: reads the plan for a smaller budget from the same pass (set by the solver)
    _read_plan: Callable[[float], Plan] | None = field(default=None, repr=False)
    #: how many (latency, score) points the exact solver kept at the last node
    frontier_points: int | None = None

    @property
    def exact(self) -> bool:
        return self.problem.exact

    def plan_at(self, budget_ms: float) -> Plan:
        """The plan the solver returns for a budget up to the solved one, from the same
        pass (no new solve)."""
        if self._read_plan is None:
            raise ValueError("this solution holds no trade-off curve to read plans from")
        return self._read_plan(budget_ms)

    def top_plans(self, k: int, budget_ms: float | None = None) -> list[Plan]:
        """Up to ``k`` distinct plans within ``budget_ms`` (default: the solved budget),
        best objective first; the first is the plan the solver returns at that budget.

        These are the ``k`` best *Pareto-optimal* plans within the budget, read from
        the trade-off curve of this pass: each is the plan returned at its own budget
        (the latency at which it is optimal, its ``meta["budget_ms"]``), so no plan is
        both at least as fast and higher-scoring. They are not the ``k`` best plans
        overall: a plan that scores second best but is slower than a better one is
        dominated and never listed. A discretised solve lists the plans returned at
        the steps of its curve (optimal on its grid of latency units).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        budget = self.budget_ms if budget_ms is None else budget_ms
        first = self.plan if budget == self.budget_ms else self.plan_at(budget)
        out = [first]
        seen = {_blocks_key(first)}
        steps = self.frontier.steps()
        for b in steps.budget_ms[steps.budget_ms <= budget][::-1].tolist():
            if len(out) >= k:
                break
            p = self.plan_at(float(b))
            if _blocks_key(p) in seen or p.meta["objective"] >= out[-1].meta["objective"]:
                continue
            seen.add(_blocks_key(p))
            out.append(p)
        return out


def _blocks_key(plan: Plan) -> str:
    return json.dumps([b.to_dict() for b in plan.blocks], sort_keys=True)


def _plan(problem: Problem, ks: Sequence[int], budget_ms: float) -> Plan:
    """The plan made of choices ``ks`` (first block first), with what the solve predicts.

    The latency is summed in plan order and then added to the constant part: the
    exact solver compares exactly this number with the budget.
    """
    latency = problem.constant_ms + float(sum(problem.latency_ms[k] for k in ks))
    objective = float(sum(problem.score[k] for k in ks))
    if problem.units is None or problem.precision is None:
        budget_units = plan_units = None
    else:
        budget_units = budget_to_units(budget_ms - problem.constant_ms, problem.precision)
        plan_units = sum(int(problem.units[k]) for k in ks)
    return Plan(
        model_fingerprint=problem.model_fingerprint,
        chain_length=problem.chain_length,
        blocks=[b for k in ks for b in problem.blocks[k]],
        method=problem.method,
        meta={
            "budget_ms": budget_ms,
            "predicted_latency_ms": latency,
            "base_latency_ms": problem.base_latency_ms,
            "predicted_speedup": problem.base_latency_ms / latency if latency > 0 else None,
            "constant_ms": problem.constant_ms,
            "objective": objective,
            "score": problem.score_mode,
            "solver": "exact" if problem.exact else "discretised",
            "precision": problem.precision,
            "budget_units": budget_units,
            "plan_units": plan_units,
            "latency_settings": problem.meta,
        },
    )
