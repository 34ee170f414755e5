"""The solver charges every block what the latency table predicts for it: layer
pruning's dropped convs their ``dropped_ms``, kim23's inner blocks their entry
without the end activation (``latency_noact_ms``)."""

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge.latency.table import block_latency_ms
from layermerge.solve import InfeasibleBudgetError, solve_tables
from layermerge.tables import make_table

from .test_solve import spaces


@st.composite
def spaces_with_context_costs(draw):
    lat, imp, conv = draw(spaces())
    # a CNN's table has no empty options (a dropped conv is priced by dropped_ms)
    keep = [r for r in lat.rows if r["kept_convs"]]
    imp = make_table("importance", [r for r in imp.rows if r["kept_convs"]], imp.meta)
    rows = []
    for r in keep:
        r = dict(r)
        all_kept = list(r["kept_convs"]) == list(range(r["start"] + 1, r["end"] + 1))
        frac = draw(st.floats(0.3, 1.0))
        r["latency_noact_ms"] = r["latency_ms"] * frac if all_kept else None
        rows.append(r)
    L = lat.chain_length
    dropped = {str(c): draw(st.floats(0.0, 0.4)) for c in range(1, L + 1)}
    meta = {**lat.meta, "dropped_ms": dropped}
    columns = (*lat.columns, "latency_noact_ms")
    return make_table("latency", rows, meta, columns=columns), imp, conv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spaces_with_context_costs(), st.floats(0.3, 1.2), st.sampled_from([None, 100.0]))
def test_plan_latency_is_the_tables_prediction(tables, frac, precision):
    lat, imp, conv = tables
    for method in ("layermerge", "kim23", "layerprune"):
        if method == "layerprune" and not conv.rows:
            continue
        try:
            sol = solve_tables(
                lat,
                imp if method != "layerprune" else None,
                conv_importance=conv if method == "layerprune" else None,
                method=method,
                budget_frac=frac,
                precision=precision,
            )
        except InfeasibleBudgetError:
            continue
        predicted = lat.constant_ms + sum(block_latency_ms(lat, b) for b in sol.plan.blocks)
        assert math.isclose(sol.predicted_latency_ms, predicted, rel_tol=1e-9, abs_tol=1e-12)
        assert predicted <= sol.budget_ms * (1 + 1e-9)


@st.composite
def spaces_with_empty_options(draw):
    """A table with empty options (a UNet's: a dropped conv is its own option row) and
    a dropped_ms that disagrees with them: the row is what both sides use."""
    lat, imp, conv = draw(spaces())
    rows = [dict(r) for r in lat.rows]
    L = lat.chain_length
    dropped_ms = {}
    for c in range(1, L + 1):
        k1 = [r for r in rows if (r["start"], r["end"], r["kernel"]) == (c - 1, c, 1)]
        if not k1:
            key = dict(start=c - 1, end=c, kernel=1, stride=1, depthwise=False, kept_convs=())
            rows.append(key | {"latency_ms": draw(st.floats(0.0, 0.5))})
        # the (disagreeing) dropped_ms only where an empty row prices the drop
        empty = not k1 or not k1[0]["kept_convs"]
        dropped_ms[str(c)] = 9.0 if empty else 0.2
    meta = {**lat.meta, "dropped_ms": dropped_ms}
    return make_table("latency", rows, meta), conv


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spaces_with_empty_options(), st.floats(0.3, 1.2), st.sampled_from([None, 100.0]))
def test_layerprune_prices_a_dropped_conv_by_its_empty_option(tables, frac, precision):
    lat, conv = tables
    if not conv.rows:
        return
    try:
        sol = solve_tables(
            lat, None, conv_importance=conv, method="layerprune", budget_frac=frac,
            precision=precision,
        )  # fmt: skip
    except InfeasibleBudgetError:
        return
    predicted = lat.constant_ms + sum(block_latency_ms(lat, b) for b in sol.plan.blocks)
    assert math.isclose(sol.predicted_latency_ms, predicted, rel_tol=1e-9, abs_tol=1e-12)
    # no dropped conv was charged the (disagreeing) dropped_ms of 9 ms
    assert all(block_latency_ms(lat, b) < 9.0 for b in sol.plan.blocks if not b.kept_convs)
