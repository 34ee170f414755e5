"""``layermerge-drop``: LayerMerge's choices plus layer pruning's drops. Its objective
is at least both methods' at every budget, it is the brute-force optimum over the union
of their choices, and a plan mixing merged blocks and dropped convs applies, merges
and exports exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layermerge import apply, build_space, merge, trace
from layermerge.export import export
from layermerge.plan import Plan
from layermerge.solve import (
    METHODS,
    InfeasibleBudgetError,
    build_problem,
    option_scores,
    solve,
    solve_tables,
)
from layermerge.tables import TableError, make_table
from layermerge.transform import compare

from .helpers import SHAPE, tiny_resnet
from .test_solve import drop_cost, spaces

TOL = 1e-9


def _fold(values):
    total = 0.0
    for v in values:
        total += v
    return total


def _objective(method, lat, imp, conv, budget, score):
    """The solver's best objective at ``budget``, or -inf where no plan fits."""
    try:
        return solve(build_problem(method, lat, imp, conv, score=score), budget).objective
    except InfeasibleBudgetError:
        return -math.inf


def union_plans(lat, imp, conv, score):
    """Every plan over the union of LayerMerge's options and layer pruning's drops, as
    (chain latency summed in plan order, score summed in plan order, blocks)."""
    scores = dict(zip(imp.keys(), option_scores(imp, score)))
    drop = dict(zip(conv.keys(), option_scores(conv, score)))
    by_start: dict[int, list] = {}
    for r in lat.rows:
        k = lat.key_of(r)
        by_start.setdefault(r["start"], []).append(
            (
                r["end"],
                r["latency_ms"],
                scores[k],
                (r["start"], r["end"], r["kernel"], r["kept_convs"]),
            )
        )
    for i, s in drop.items():
        by_start.setdefault(i - 1, []).append((i, drop_cost(lat, i), s, (i - 1, i, 1, ())))

    def chains(pos):
        if pos == lat.chain_length:
            yield ()
            return
        for item in by_start.get(pos, ()):
            for rest in chains(item[0]):
                yield (item, *rest)

    return [
        (_fold(i[1] for i in p), _fold(i[2] for i in p), tuple(i[3] for i in p)) for p in chains(0)
    ]


def test_the_method_is_listed():
    assert "layermerge-drop" in METHODS


def neutral_singles(imp):
    """``imp`` with every unchanged single-conv option scoring what an untouched network
    scores (importance 1, delta_acc 0), as layer pruning scores a kept conv."""
    rows = []
    for r in imp.rows:
        if r["end"] - r["start"] == 1 and r["kept_convs"] == (r["end"],):
            r = {**r, "importance": 1.0, "delta_acc": 0.0}
        rows.append(r)
    return make_table("importance", rows, imp.meta)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(space=spaces(max_len=5), score=st.sampled_from(["exp", "additive"]))
def test_objective_is_at_least_layermerge_and_layerprune(space, score):
    """With the unchanged single-conv options neutral (a calibrated table's expectation),
    every layerprune plan is a layermerge-drop plan with the same objective."""
    lat, imp, conv = space
    imp = neutral_singles(imp)
    problem = build_problem("layermerge-drop", lat, imp, conv, score=score)
    assert problem.method == "layermerge-drop"
    lm = build_problem("layermerge", lat, imp, score=score)
    lp = build_problem("layerprune", lat, None, conv, score=score)
    # the choices are exactly both methods' LayerMerge options and drops
    assert problem.n_choices == lm.n_choices + len(conv.rows)
    # every budget at which either method's curve steps, and a few in between
    budgets = {lat.constant_ms + x for x in (0.0, 0.5, 1.0, 2.0, 5.0, 20.0)}
    for p in (lm, lp):
        sol = solve(p, lat.constant_ms + 1e6)
        budgets.update(sol.frontier.steps().budget_ms.tolist())
    for b in sorted(budgets):
        ours = _objective("layermerge-drop", lat, imp, conv, b, score)
        theirs = max(
            _objective("layermerge", lat, imp, conv, b, score),
            _objective("layerprune", lat, imp, conv, b, score),
        )
        tol = TOL * max(1.0, abs(theirs)) if math.isfinite(theirs) else 0.0
        assert ours >= theirs - tol


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=spaces(max_len=5),
    frac=st.one_of(st.floats(0.0, 1.2), st.sampled_from([0.25, 0.5, 1.0])),
    score=st.sampled_from(["exp", "additive"]),
)
def test_matches_brute_force_over_the_union(space, frac, score):
    lat, imp, conv = space
    plans = union_plans(lat, imp, conv, score)
    c = lat.constant_ms
    budget = c + frac * max(p[0] for p in plans)
    if frac in (0.25, 0.5, 1.0):  # exactly at some plan's latency
        budget = c + sorted(p[0] for p in plans)[int(frac * (len(plans) - 1))]
    fitting = [p for p in plans if c + p[0] <= budget]
    problem = build_problem("layermerge-drop", lat, imp, conv, score=score)
    if not fitting:
        with pytest.raises(InfeasibleBudgetError):
            solve(problem, budget)
        return
    sol = solve(problem, budget)
    best = max(p[1] for p in fitting)
    tol = TOL * max(1.0, max(abs(p[1]) for p in fitting))
    assert abs(sol.objective - best) <= tol
    assert sol.predicted_latency_ms <= budget
    blocks = tuple((b.start, b.end, b.kernel, b.kept_convs) for b in sol.plan.blocks)
    assert any(
        p[2] == blocks and abs(p[1] - sol.objective) <= tol and c + p[0] == sol.predicted_latency_ms
        for p in fitting
    )
    assert sol.plan.method == "layermerge-drop"


def _pick(space_opts, s, e, kept):
    return next(o for o in space_opts if (o.start, o.end, o.kept_convs) == (s, e, kept))


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_a_plan_with_a_merge_and_drops_applies_merges_and_exports_exactly(tmp_path):
    torch.manual_seed(0)
    traced = trace(tiny_resnet(), SHAPE)
    space = build_space(traced.chain)
    chain = traced.chain
    L = chain.length
    reducible = [i for i in range(1, L + 1) if not chain.conv(i).irreducible]
    merges = [o for o in space.options if o.end - o.start >= 2 and len(o.kept_convs) >= 2]
    assert merges and reducible
    merged = merges[0]
    droppable = [i for i in reducible if i > merged.end]
    assert len(droppable) >= 2
    # additive scores: a free merge, cheap drops of the convs after it, expensive
    # drops and prunes elsewhere; latency 1 ms per conv, the merge 0.2 ms less, drops free
    lat_rows, imp_rows = [], []
    for o, key in zip(space.options, space.option_rows()):
        all_kept = o.kept_convs == tuple(range(o.start + 1, o.end + 1))
        ms = (
            (o.end - o.start) - 0.2
            if o == merged
            else 0.5 * len(o.kept_convs)
            if not all_kept
            else 1.0 * (o.end - o.start)
        )
        delta = 0.0 if all_kept and o.end - o.start == 1 else -0.1 if o == merged else -30.0
        lat_rows.append(key | {"latency_ms": ms})
        imp_rows.append(key | {"importance": math.exp(delta / 100), "delta_acc": delta})
    conv_rows = [
        {"conv": i, "importance": 1.0, "delta_acc": -1.0 if i in droppable else -50.0}
        for i in reducible
    ]
    meta = {**space.table_meta(), "constant_ms": 0.0}
    lat = make_table("latency", lat_rows, meta)
    imp = make_table("importance", imp_rows, meta)
    conv = make_table(
        "conv_importance", conv_rows, meta, columns=("conv", "importance", "delta_acc")
    )
    # the budget needs the merge's 0.2 ms on top of two drops
    budget = L - 2.0 - 0.1
    sol = solve_tables(
        lat, imp, method="layermerge-drop", conv_importance=conv, budget_ms=budget, score="additive"
    )
    plan = sol.plan
    assert plan.method == "layermerge-drop"
    dropped = [b.end for b in plan.blocks if not b.kept_convs]
    assert len(dropped) == 2 and set(dropped) <= set(droppable)
    assert any(b.end - b.start >= 2 and len(b.kept_convs) >= 2 for b in plan.blocks)
    assert sol.objective == pytest.approx(-0.1 - 2.0)
    # neither method alone reaches it
    with pytest.raises(InfeasibleBudgetError):
        solve_tables(lat, imp, method="layermerge", budget_ms=budget, score="additive")
    lp = solve_tables(
        lat, None, method="layerprune", conv_importance=conv, budget_ms=budget, score="additive"
    )
    assert lp.objective < sol.objective

    space.check_plan(plan)
    train_net = apply(traced, plan).eval()
    deploy = merge(train_net)  # verifies the deploy network against the train-time one
    err = compare(train_net, deploy)
    assert err["max_rel_err"] <= 1e-4
    assert sum(isinstance(m, torch.nn.Conv2d) for m in deploy.modules()) < sum(
        isinstance(m, torch.nn.Conv2d) for m in traced.model.modules()
    )
    res = export(deploy, "torchscript", tmp_path / "net.pt", SHAPE)
    assert res["max_rel_err"] <= 1e-4
    # the deploy network computes what the train-time network does on a fixed input
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        np.testing.assert_allclose(deploy(x).numpy(), train_net(x).numpy(), rtol=1e-4, atol=1e-5)


def test_missing_conv_importance_is_a_clear_error():
    key = dict(start=0, end=1, kernel=3, stride=1, depthwise=False, kept_convs=(1,))
    lat, imp, conv = (
        make_table("latency", [key | {"latency_ms": 1.0}], M),
        make_table("importance", [key | {"importance": 1.0}], M),
        make_table("conv_importance", [{"conv": 1, "importance": 0.9}], M),
    )
    with pytest.raises(TableError, match="layermerge-drop method needs a per-conv importance"):
        solve_tables(lat, imp, method="layermerge-drop", budget_frac=0.9)
    with pytest.raises(TableError, match="layermerge-drop method needs an importance table"):
        solve_tables(lat, None, method="layermerge-drop", conv_importance=conv, budget_frac=0.9)
    # with both it solves, and may drop the conv
    sol = solve_tables(lat, imp, method="layermerge-drop", conv_importance=conv, budget_ms=0.5)
    assert [b.kept_convs for b in sol.plan.blocks] == [()]
    # the tables' kinds are checked
    with pytest.raises(TableError, match="not a per-conv importance"):
        build_problem("layermerge-drop", lat, imp, imp)


M = {"model_fingerprint": "fp", "chain_length": 1, "constant_ms": 0.0}


def test_cli_and_config_accept_the_method(tmp_path, capsys):
    from layermerge.cli import main
    from layermerge.pipeline import ConfigError, parse_config
    from layermerge.report import METHOD_LABELS
    from layermerge.tables import write_table

    assert METHOD_LABELS["layermerge-drop"] == "LayerMerge + drops"
    cfg = parse_config(
        {
            "model": "layermerge:resnet8",
            "data": "fashion-mnist",
            "solve": {"methods": ["layermerge", "layermerge-drop"]},
        }
    )
    assert cfg.solve.methods == ["layermerge", "layermerge-drop"]
    with pytest.raises(ConfigError, match="layermerge-drop"):  # listed among the known ones
        parse_config(
            {"model": "layermerge:resnet8", "data": "fashion-mnist", "solve": {"methods": ["x"]}}
        )
    meta = {"model_fingerprint": "fp", "chain_length": 2, "constant_ms": 0.0}
    spec = [(0, 1, 3, (1,), 1.0, 0.0), (1, 2, 3, (2,), 1.0, 0.0), (0, 2, 5, (1, 2), 1.5, -2.0)]
    k = [
        dict(start=s, end=e, kernel=kk, stride=1, depthwise=False, kept_convs=kept)
        for s, e, kk, kept, _, _ in spec
    ]
    lat = write_table(
        tmp_path / "lat.csv", "latency", [a | {"latency_ms": r[4]} for a, r in zip(k, spec)], meta
    )
    imp = write_table(
        tmp_path / "imp.csv",
        "importance",
        [a | {"importance": math.exp(r[5] / 100), "delta_acc": r[5]} for a, r in zip(k, spec)],
        meta,
    )
    conv = write_table(
        tmp_path / "conv.csv",
        "conv_importance",
        [{"conv": 2, "importance": 0.97, "delta_acc": -3.0}],
        meta,
    )
    out = tmp_path / "plan.json"
    base = f"solve --latency {lat} --importance {imp} --method layermerge-drop --budget-ms 1.0 --out {out}"
    assert main(base.split()) == 2
    assert "--method layermerge-drop needs --conv-importance" in capsys.readouterr().err
    assert main(f"{base} --conv-importance {conv} --json".split()) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "layermerge-drop"
    plan = Plan.load(out)
    assert [b.kept_convs for b in plan.blocks] == [(1,), ()]
