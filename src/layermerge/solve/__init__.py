"""The LayerMerge dynamic program, its two baselines and their union.

All four methods reduce to one problem on the chain ``0..L``: choose a
partition into spans, one *choice* per span, maximising the sum of the
choices' scores subject to the sum of their latencies (plus the constant part
of the network) staying within a budget. They differ only in the choices:

- ``layermerge``: every option of every valid block (merge + prune).
- ``kim23``: activation removal only (Kim et al. 2023). A span's one choice
  keeps all its convs; its latency is the cheapest way to realise the
  activation-free span as consecutive merged convs (a second DP level).
- ``layerprune``: every activation stays; conv ``i`` is kept (latency of the
  single-conv block) or, when it has a per-conv importance, dropped (what its
  node still costs: its residual add, its activation).
- ``layermerge-drop``: ``layermerge``'s choices plus ``layerprune``'s drops.
  LayerMerge never offers a block's empty choice (every conv pruned, the block
  an identity); with the drops its space contains both methods' plans, so its
  optimum is at least LayerMerge's, and layer pruning's where the importance
  table scores each unchanged single-conv option as layer pruning scores a kept
  conv (1 exp, 0 additive; a calibrated table measures about that).

Two solvers:

- exact (the default, ``precision=None``): a dynamic program over Pareto
  frontiers. ``F[e]`` holds every partial plan of ``0..e`` that no other
  partial plan beats on both latency and score, as (latency, score) pairs over
  the table's real-valued latencies; ``F[0] = {(0, 0)}`` and ``F[e]`` is the
  non-dominated part of ``F[s_k] + (T_k, I_k)`` over the choices ``k`` ending at
  ``e``. Partial plans that cannot reach ``L`` within the budget (their latency
  plus the fastest way on from ``e``) are dropped. ``F[L]`` is the whole
  score/latency trade-off curve up to the budget, exact at every breakpoint,
  and the plan returned is the true optimum: its latency, summed in plan order
  and added to the constant part, is compared with the budget as it is reported.
- discretised (opt-in, ``precision=P``): latencies are rounded *up* to integer
  units of ``1/P`` ms so that a plan that fits the discretised budget also fits
  the real one (to a relative 1e-9: float noise is not rounded up). The DP table ``D[e][t]`` holds the best score of a partition of
  ``0..e`` whose units are at most ``t``; ``D[0][t] = 0`` and
  ``D[e][t] = max_k D[s_k][t - g_k] + I_k``. Rounding up costs objective: each
  block can lose up to one unit of the budget, so the plan can fall short of
  the optimum, and a budget that the fastest plan meets can be reported as
  infeasible when that plan's rounded latency exceeds it.

Tie-breaking (deterministic): among plans whose score is within a tiny
tolerance of the best, the one with the lowest latency (the fewest units when
discretised) is returned. Exact ties at one state keep the choice seen first,
in the order (end, start, kernel, stride, depthwise): the longest last block,
then the smallest merged kernel.

This module needs only numpy.
"""

from __future__ import annotations

import math

from ..tables import Table
from .discrete import _reference_dp as _reference_dp  # the benchmark's baseline
from .discrete import _solve_discrete
from .exact import _solve_exact
from .problem import (
    DEFAULT_PRECISION,
    MAX_DP_CELLS,
    MAX_FRONTIER_CANDIDATES,
    METHODS,
    SCORE_MODES,
    Frontier,
    InfeasibleBudgetError,
    Problem,
    Solution,
    base_latency_ms,
    budget_to_units,
    build_problem,
    kim23_problem,
    layermerge_drop_problem,
    layermerge_problem,
    layerprune_problem,
    option_scores,
    resolve_budget,
    to_units,
)

__all__ = [
    "DEFAULT_PRECISION",
    "MAX_DP_CELLS",
    "MAX_FRONTIER_CANDIDATES",
    "METHODS",
    "SCORE_MODES",
    "Frontier",
    "InfeasibleBudgetError",
    "Problem",
    "Solution",
    "base_latency_ms",
    "budget_to_units",
    "build_problem",
    "kim23_problem",
    "layermerge_drop_problem",
    "layermerge_problem",
    "layerprune_problem",
    "option_scores",
    "resolve_budget",
    "solve",
    "solve_tables",
    "to_units",
]


def solve(problem: Problem, budget_ms: float) -> Solution:
    """Best plan of ``problem`` within ``budget_ms`` (constant part included) and the
    trade-off curve for every budget up to it.

    Exact for a problem built without a precision; for a discretised one, the best
    plan whose rounded-up latency fits the budget in units.
    """
    if not math.isfinite(budget_ms):
        raise ValueError(f"the budget must be a finite number of ms, got {budget_ms}")
    if problem.exact:
        return _solve_exact(problem, budget_ms)
    return _solve_discrete(problem, budget_ms)


def solve_tables(
    latency: Table,
    importance: Table | None = None,
    *,
    method: str = "layermerge",
    conv_importance: Table | None = None,
    budget_ms: float | None = None,
    budget_frac: float | None = None,
    speedup: float | None = None,
    score: str = "exp",
    precision: float | None = None,
) -> Solution:
    """Build the problem of ``method`` from tables and solve it at one budget, given in
    ms, as a fraction of the unmodified network's latency, or as a speed-up over it.

    Exact unless ``precision`` (units per ms) asks for a discretised solve."""
    problem = build_problem(
        method, latency, importance, conv_importance, score=score, precision=precision
    )
    budget = resolve_budget(
        problem.base_latency_ms, budget_ms=budget_ms, budget_frac=budget_frac, speedup=speedup
    )
    return solve(problem, budget)
