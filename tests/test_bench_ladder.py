"""The DDPM ladder benchmark's verdict: which metric orders which rungs, and what the
JSON reports as the chosen one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ddpm_ladder.py"


@pytest.fixture(scope="module")
def ladder():
    spec = importlib.util.spec_from_file_location("bench_ddpm_ladder", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _rung(name, family, rank, fid, kid, sd=0.1):
    return {
        "name": name,
        "family": family,
        "expected_rank": rank,
        "fid": fid,
        "fid_ci95": [fid - 2 * sd, fid + 2 * sd],
        "kid": kid,
        "kid_ci95": [kid - 2 * sd, kid + 2 * sd],
    }


def _result():
    # KID swaps the two late training rungs; FID orders all of them
    rows = [
        _rung("base", "all", 1, 10.0, 1.0),
        _rung("step2000", "training steps", 2, 20.0, 3.0),
        _rung("step1000", "training steps", 3, 28.0, 5.0),
        _rung("step500", "training steps", 4, 29.0, 4.5),
        _rung("ddim10", "DDIM steps", 2, 10.2, 1.5),
    ]
    floor = {"name": "real-vs-real", "fid": 0.1, "kid": 0.0, "fid_ci95": [0, 0.2]}
    return {"rungs": rows, "real_vs_real": floor}


def test_judge_reports_the_chosen_metric(ladder):
    res = _result()
    ladder.judge(res, "fid")
    assert res["chosen_metric"] == "fid" and res["value_key"].startswith("fid")
    assert [r["value"] for r in res["rungs"]] == [10.0, 20.0, 28.0, 29.0, 10.2]
    assert res["real_vs_real"]["value"] == 0.1
    assert res["order_correct"] is True
    # base vs ddim10 are in order but their intervals overlap
    assert res["order"]["fid"]["overlapping_intervals"] == ["base ~ ddim10"]
    assert res["order"]["kid"]["wrong"] == ["step1000 !< step500"]

    ladder.judge(res, "kid")
    assert res["order_correct"] is False
    assert res["rungs"][3]["value"] == 4.5 and res["metric"].startswith("KID")


def test_floor_above_a_rung_is_wrong(ladder):
    res = _result()
    res["real_vs_real"]["fid"] = 15.0
    ladder.judge(res, "fid")
    assert not res["order_correct"]
    assert "real-vs-real !< base" in res["order"]["fid"]["wrong"]
