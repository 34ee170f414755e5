"""``layermerge solve``: outputs, budget forms and one-line errors."""

from __future__ import annotations

import csv
import json
import math

import pytest

from layermerge.cli import main
from layermerge.plan import Plan
from layermerge.solve import solve_tables
from layermerge.tables import meta_path, read_table, write_table

META = {
    "model_fingerprint": "fp",
    "chain_length": 3,
    "constant_ms": 1.0,
    "backend": "torch",
    "threads": 1,
    "batch_size": 1,
}
SPEC = [  # start, end, kernel, kept, latency_ms, delta_acc
    (0, 1, 3, (1,), 1.0, 0.0),
    (1, 2, 3, (2,), 1.0, 0.0),
    (2, 3, 3, (3,), 1.0, 0.0),
    (0, 2, 5, (1, 2), 1.5, -2.0),
    (0, 2, 3, (2,), 0.9, -6.0),
    (1, 3, 5, (2, 3), 1.2, -1.0),
    (0, 3, 7, (1, 2, 3), 2.5, -3.0),
]


def key(s, e, k, kept):
    return dict(start=s, end=e, kernel=k, stride=1, depthwise=False, kept_convs=kept)


@pytest.fixture
def tables(tmp_path):
    lat = write_table(
        tmp_path / "lat.csv",
        "latency",
        [key(s, e, k, kept) | {"latency_ms": ms} for s, e, k, kept, ms, _ in SPEC],
        META,
    )
    imp = write_table(
        tmp_path / "imp.csv",
        "importance",
        [
            key(s, e, k, kept) | {"importance": math.exp(d / 100), "delta_acc": d}
            for s, e, k, kept, _, d in SPEC
        ],
        META,
    )
    conv = write_table(
        tmp_path / "conv.csv",
        "conv_importance",
        [{"conv": 2, "importance": 0.97, "delta_acc": -3.0}],
        META,
    )
    return tmp_path, lat, imp, conv


def cli(line):
    """Run ``layermerge`` with a command line (paths here have no spaces)."""
    return main(line.split())


def test_json_output_plan_frontier_and_plot(tables, capsys):
    d, lat, imp, _ = tables
    rc = cli(
        f"solve --latency {lat} --importance {imp} --budget-ms 3.5 --json --out {d}/plan.json "
        f"--frontier {d}/curve.csv --plot {d}/curve.png"
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    expected = solve_tables(read_table(lat), read_table(imp), budget_ms=3.5)
    assert out["method"] == "layermerge" and out["score"] == "exp"
    assert out["objective"] == pytest.approx(expected.objective)
    assert out["predicted_latency_ms"] == pytest.approx(expected.predicted_latency_ms)
    assert out["budget_ms"] == 3.5 and out["base_latency_ms"] == 4.0
    assert out["blocks"] == len(expected.plan.blocks) == 2
    plan = Plan.load(out["plan"])
    assert plan.blocks == expected.plan.blocks
    assert plan.model_fingerprint == "fp" and plan.method == "layermerge"
    assert plan.meta["tables"]["latency"] == [str(lat)]
    assert plan.meta["latency_settings"] == {"backend": "torch", "threads": 1, "batch_size": 1}

    with open(d / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    budgets = [float(r["budget_ms"]) for r in rows]
    objectives = [float(r["objective"]) for r in rows]
    assert budgets == sorted(budgets) and objectives == sorted(objectives)
    assert all(float(r["latency_ms"]) <= float(r["budget_ms"]) + 1e-9 for r in rows)
    # the last step is the chosen plan; the first is the fastest plan (2.9 ms)
    assert objectives[-1] == pytest.approx(out["objective"])
    assert float(rows[-1]["latency_ms"]) == pytest.approx(out["predicted_latency_ms"])
    assert budgets[0] == pytest.approx(2.9)
    assert (d / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_human_summary(tables, capsys):
    d, lat, imp, _ = tables
    assert cli(f"solve --latency {lat} --importance {imp} --speedup 1.25 --out {d}/p.json") == 0
    out = capsys.readouterr().out
    assert out.startswith("layermerge plan: 2 blocks (1 merged), 3/3 convs kept")
    assert "budget 3.200 ms, predicted latency 3.200 ms (unmodified 4.000 ms, 1.25x)" in out
    assert f"wrote {d}/p.json" in out


def test_budget_forms_agree(tables, capsys):
    d, lat, imp, _ = tables
    results = []
    for budget in ("--budget-ms 3.2", "--budget-frac 0.8", "--speedup 1.25"):
        assert cli(f"solve --latency {lat} --importance {imp} {budget} --out {d}/p --json") == 0
        results.append(json.loads(capsys.readouterr().out))
    assert [r["budget_ms"] for r in results] == pytest.approx([3.2] * 3)
    assert len({(r["objective"], r["predicted_latency_ms"]) for r in results}) == 1


def test_baselines_and_options(tables, capsys):
    d, lat, imp, conv = tables
    rc = cli(
        f"solve --latency {lat} --importance {imp} --budget-ms 3.5 --method kim23 "
        f"--score additive --precision 1000 --out {d}/k.json --json"
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    plan = Plan.load(d / "k.json")
    assert plan.method == "kim23" and plan.kept_convs == [1, 2, 3]
    # additive: spans (0,1)+(1,3) lose 1 point; (0,2)+(2,3) would lose 2
    assert out["objective"] == -1.0 and plan.meta["precision"] == 1000
    rc = cli(
        f"solve --latency {lat} --conv-importance {conv} --budget-ms 3.0 --method layerprune "
        f"--out {d}/l.json --json"
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    plan = Plan.load(d / "l.json")
    assert plan.kept_convs == [1, 3] and plan.kept_activations == [1, 2, 3]
    assert out["objective"] == pytest.approx(2.97)


def test_shards_are_combined(tables, capsys):
    d, lat, imp, _ = tables
    rows = read_table(lat).rows
    a = write_table(d / "a.csv", "latency", rows[:4], META)
    b = write_table(d / "b.csv", "latency", rows[4:], META)
    assert (
        cli(f"solve --latency {a} {b} --importance {imp} --budget-ms 3.2 --out {d}/p --json") == 0
    )
    assert json.loads(capsys.readouterr().out)["predicted_latency_ms"] == pytest.approx(3.2)


def run_error(line, capsys, code=2):
    """A refusal: exit 2 for a wrong command line, 1 for inputs that cannot be used."""
    rc = cli(line)
    err = capsys.readouterr().err
    assert rc == code
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("layermerge solve: error: ")
    return err


def test_infeasible_budget_exits_2_with_the_smallest_feasible_latency(tables, capsys):
    d, lat, imp, _ = tables
    line = f"solve --latency {lat} --importance {imp} --budget-ms 2.5 --out {d}/p.json"
    err = run_error(line, capsys)
    assert "no layermerge plan fits a latency budget of 2.5" in err
    assert "fastest plan takes 2.9" in err
    coarse = run_error(line + " --precision 100", capsys)
    assert "smallest feasible budget is 2.9000 ms" in coarse
    assert not (d / "p.json").exists()


def test_precision_opts_into_the_discretised_solve(tables, capsys):
    """A budget between two plans' latencies: the discretised solve (units of 1/P ms,
    rounded up) never beats the exact one, and records its precision."""
    d, lat, imp, _ = tables
    for precision in (10, 100):
        line = f"solve --latency {lat} --importance {imp} --budget-ms 3.25 --json"
        assert cli(f"{line} --precision {precision} --out {d}/p{precision}.json") == 0
        out = json.loads(capsys.readouterr().out)
        plan = Plan.load(d / f"p{precision}.json")
        assert plan.meta["precision"] == precision and plan.meta["solver"] == "discretised"
        expected = solve_tables(read_table(lat), read_table(imp), budget_ms=3.25)
        assert out["objective"] <= expected.objective + 1e-12
        assert out["predicted_latency_ms"] <= 3.25


def test_table_errors_are_one_line(tables, capsys):
    # a file that is missing or a value out of range: 2; tables that cannot be used: 1
    d, lat, imp, conv = tables
    budget = f"--budget-frac 0.9 --out {d}/p.json"
    err = run_error(f"solve --latency {d}/none.csv --importance {imp} {budget}", capsys)
    assert "none.csv does not exist" in err
    err = run_error(f"solve --latency {imp} --importance {imp} {budget}", capsys, code=1)
    assert "this is a importance table, but a latency table is needed here" in err
    other = write_table(
        d / "other.csv", "importance", read_table(imp).rows, {**META, "model_fingerprint": "zz"}
    )
    err = run_error(f"solve --latency {lat} --importance {other} {budget}", capsys, code=1)
    assert "different models" in err
    shard = write_table(d / "s.csv", "latency", read_table(lat).rows[:1], {**META, "threads": 4})
    err = run_error(f"solve --latency {lat} {shard} --importance {imp} {budget}", capsys, code=1)
    assert "threads 1 vs 4" in err
    err = run_error(f"solve --latency {lat} --method layerprune {budget}", capsys)
    assert "--method layerprune needs --conv-importance" in err
    err = run_error(
        f"solve --latency {lat} --conv-importance {conv} --method layerprune --budget-ms -1 "
        f"--out {d}/p.json",
        capsys,
    )
    assert "budget_ms must be a positive number" in err
    meta_path(lat).write_text("{}")
    err = run_error(f"solve --latency {lat} --importance {imp} {budget}", capsys, code=1)
    assert "no 'schema' field" in err


def test_budget_is_required_and_exclusive(tables, capsys):
    d, lat, imp, _ = tables
    for extra in ("", " --budget-ms 3 --speedup 2"):
        assert cli(f"solve --latency {lat} --importance {imp} --out {d}/p.json{extra}") == 2
        assert "--budget-ms" in capsys.readouterr().err
