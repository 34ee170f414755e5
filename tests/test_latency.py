"""Latency layer: timing protocol, what an entry times, tables (resume, settings),
backends and the end-to-end benchmark. Tiny models and short timings throughout."""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import layermerge.latency as latency
from layermerge import apply, build_space, conv_weights, load_model, merge, trace
from layermerge.families.cnn import end_activation
from layermerge.latency import (
    BackendError,
    BackendSettings,
    TimingConfig,
    benchmark,
    build_latency_table,
    check_settings,
    make_backend,
    measure,
    option_conv,
    option_input_shape,
    option_module,
    predict_latency,
    read_latency_tables,
)
from layermerge.latency.backends import _PROFILED_CALLS
from layermerge.latency.table import option_input_shapes
from layermerge.plan import PlanError
from layermerge.solve import base_latency_ms, solve_tables
from layermerge.tables import (
    TableError,
    concat_tables,
    make_table,
    meta_path,
    read_table,
    write_table,
)

FAST = TimingConfig(
    warmup_runs=3, warmup_s=0.0, min_warmup_runs=1, min_runs=3, max_runs=6, max_time_s=0.02
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_threads():
    # backends pin torch's thread count; other tests should not inherit it
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resnet8():
    lm = load_model("layermerge:resnet8")
    return trace(lm.model, lm.input_shape)


@pytest.fixture(scope="module")
def mbv2():
    # 64x64 keeps every conv on a map larger than 1x1, so the chain is the usual one
    lm = load_model("torchvision:mobilenet_v2", input_shape=(3, 64, 64))
    return trace(lm.model, lm.input_shape)


@pytest.fixture(scope="module")
def torch_table(resnet8, tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "resnet8_torch.csv"
    n = torch.get_num_threads()
    table = build_latency_table(
        resnet8, path, make_backend(backend="torch"), timing=FAST, model="layermerge:resnet8"
    )
    torch.set_num_threads(n)
    return table


# ----------------------------------------------------------------------------- timing


class FakeClock:
    """perf_counter that only moves when the timed function runs."""

    def __init__(self, durations_ms):
        self.t = 0.0
        self.durations = iter(durations_ms)
        self.calls = 0

    def perf_counter(self):
        return self.t

    def run(self):
        self.t += next(self.durations) / 1e3
        self.calls += 1


def fake(monkeypatch, durations):
    clock = FakeClock(durations)
    monkeypatch.setattr(time, "perf_counter", clock.perf_counter)
    return clock


def test_measure_stops_when_the_minimum_is_stable(monkeypatch):
    clock = fake(monkeypatch, [5.0] * 10 + [2.0] * 10_000)
    m = measure(clock.run, TimingConfig(warmup_runs=10, min_runs=8, max_time_s=100))
    assert m.min_ms == pytest.approx(2.0)
    assert m.median_ms == pytest.approx(2.0)
    assert (m.stopped, m.runs, m.warmup_runs) == ("stable", 8, 10)


def test_measure_ignores_outliers_and_reports_spread(monkeypatch):
    durs = [1.0] * 5 + [1.0, 50.0, 1.1, 1.0, 0.9, 1.0, 1.2, 1.0] * 100
    clock = fake(monkeypatch, durs)
    cfg = TimingConfig(warmup_runs=5, min_runs=8, statistic="median", rel_tol=0.06, max_time_s=99)
    m = measure(clock.run, cfg)
    assert m.median_ms == pytest.approx(1.0)
    assert m.min_ms == pytest.approx(0.9)
    assert m.p75_ms < 2
    assert m.stopped == "stable"


def test_measure_keeps_going_while_calls_get_faster_then_stops_at_the_cap(monkeypatch):
    # every call is faster than all before: the minimum never settles
    clock = fake(monkeypatch, [10.0 - i * 1e-3 for i in range(100_000)])
    cfg = TimingConfig(warmup_runs=2, min_runs=5, max_time_s=0.2, rel_tol=1e-6)
    m = measure(clock.run, cfg)
    assert m.stopped == "time"
    assert 20 <= m.runs <= 21  # 0.2 s of just under 10 ms calls
    assert m.min_ms == pytest.approx(10.0 - (m.warmup_runs + m.runs - 1) * 1e-3)


def test_median_rule_waits_for_a_narrow_interval(monkeypatch):
    rng = random.Random(0)
    wide = [rng.choice([1.0, 3.0]) for _ in range(100_000)]
    clock = fake(monkeypatch, wide)
    cfg = TimingConfig(warmup_runs=1, min_runs=5, max_runs=300, max_time_s=99, statistic="median")
    m = measure(clock.run, cfg)
    assert m.stopped == "max_runs" and m.runs == 300
    assert m.ci_rel > cfg.rel_tol


def test_reference_protocol_is_fixed(monkeypatch):
    clock = fake(monkeypatch, [1.0] * 600)
    m = measure(clock.run, TimingConfig.reference())
    assert (m.warmup_runs, m.runs, m.stopped) == (300, 200, "fixed")
    assert clock.calls == 500


def test_interleaved_alternates_order_and_warms_each_turn():
    order = []
    runs = {n: (lambda n=n: order.append(n)) for n in ("a", "b")}
    res = latency.measure_interleaved(runs, rounds=2, calls_per_round=2, warmup_s=0.0)
    assert res["a"].runs == res["b"].runs == 4
    timed = order[4:]  # two warm-up calls each first
    # one untimed call + two timed per turn; round 2 runs b first
    assert timed == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3


# ------------------------------------------------------------------ what an entry times


@pytest.mark.parametrize("which", ["resnet8", "mbv2"])
def test_option_module_matches_the_deploy_network(which, request):
    """Every block of merged networks is exactly the conv the table times (same
    geometry) with the activation apply() keeps at its end."""
    traced = request.getfixturevalue(which)
    chain = traced.chain
    space = build_space(chain, conv_weights(traced))
    rng = random.Random(1)
    plans = [space.identity_plan(), space.deepest_plan(), space.random_plan(rng)]
    for plan in plans:
        train = apply(traced, plan)
        deploy = merge(train, verify=False)
        mods = dict(train.named_modules())
        for b in plan.blocks:
            merged = deploy.get_submodule(f"lm_block_{b.start}_{b.end}")
            mine = option_conv(chain, b)
            geometry = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "groups")
            assert {g: getattr(merged, g) for g in geometry} == {
                g: getattr(mine, g) for g in geometry
            }, b
            act = end_activation(traced, b)
            inserted = f"lm_block_{b.start}_{b.end}_act" in mods
            own = chain.nodes[b.end].activation is not None
            assert (act is not None) == (own or inserted), b
            if inserted:
                assert type(act) is type(mods[f"lm_block_{b.start}_{b.end}_act"])


def test_linear_end_nodes_get_the_network_activation_only_for_long_blocks(mbv2):
    chain = mbv2.chain
    space = build_space(chain)
    linear = [o for o in space.options if chain.nodes[o.end].activation is None]
    assert linear
    for o in linear:
        act = end_activation(mbv2, o)
        if o.length == 1:
            assert act is None
        else:
            assert isinstance(act, nn.ReLU6)


@pytest.mark.parametrize("which", ["resnet8", "mbv2"])
def test_option_module_maps_the_start_shape_to_the_end_shape(which, request):
    traced = request.getfixturevalue(which)
    chain = traced.chain
    options = build_space(chain).options
    for o in random.Random(0).sample(options, min(len(options), 60)):
        shapes = option_input_shapes(traced, o)
        assert shapes[0] == option_input_shape(chain, o)
        with torch.no_grad():
            y = option_module(traced, o)(*(torch.zeros(1, *s) for s in shapes))
        assert tuple(y.shape[1:]) == tuple(chain.nodes[o.end].shape), o


# ----------------------------------------------------------------------------- tables


def test_table_has_every_option_once_with_settings_and_constant(resnet8, torch_table):
    space = build_space(resnet8.chain, conv_weights(resnet8))
    t = torch_table
    assert sorted(t.keys()) == sorted(o.key for o in space.options)
    meta = t.meta
    for k in ("backend", "device", "device_name", "threads", "batch_size", "dtype", "versions"):
        assert k in meta, k
    assert (meta["backend"], meta["threads"], meta["batch_size"], meta["dtype"]) == (
        "torch",
        1,
        1,
        "float32",
    )
    assert meta["versions"]["torch"] == torch.__version__.split("+")[0]
    assert meta["timing"]["protocol"] == "adaptive" and meta["statistic"] == "min"
    assert meta["clock"] == "cpu"  # one thread on the CPU: CPU time, not wall time
    assert meta["complete"] is True
    for r in t.rows:
        # the start node, then the skip tensor of each residual add the option keeps
        first = r["input_shape"].split("+")[0]
        assert first == "x".join(map(str, resnet8.chain.nodes[r["start"]].shape))
        assert r["input_shape"].count("+") == len(r["skips"].split(";") if r["skips"] else [])
        expect = max(r["min_ms"] - meta["call_overhead_ms"] - r["layout_ms"], 0.0)
        assert r["entry_ms"] == pytest.approx(expect)
        # scaled by the slowdown and plus the memory term, both fitted with the
        # constant (a network's time grows with its entries' and its weights)
        slowdown, beta = meta["slowdown"], meta["memory_ms_per_mweight"]
        assert slowdown >= 0 and beta >= 0 and r["weights"] > 0
        want = (1 + slowdown) * expect + beta * r["weights"] / 1e6
        assert r["latency_ms"] == pytest.approx(want)
        assert 3 <= r["runs"] <= 6
    # the constant makes the unmodified network's prediction its measured latency
    identity = space.identity_plan()
    # (exact unless noise made the entries add up to more than the network: then the
    # constant is 0 and constant_raw_ms says by how much)
    exact = meta["identity_ms"] - meta.get("constant_raw_ms", 0.0)
    assert predict_latency(t, identity) == pytest.approx(exact)
    assert base_latency_ms(t) == pytest.approx(exact)
    assert meta["constant_ms"] == pytest.approx(
        exact - sum(t.row(b.key)["latency_ms"] for b in identity.blocks)
    )


def test_constant_pools_the_calls_spread_over_the_build(resnet8, torch_table):
    backend = make_backend(backend="torch")
    fast = latency.measure_constant(resnet8, backend, torch_table, timing=FAST, samples_ms=[1e-6])
    entries = fast["identity_entries_ms"]
    assert fast["identity_ms"] == 1e-6  # the minimum over all calls, earlier ones included
    assert fast["constant_ms"] == 0.0
    assert fast["constant_raw_ms"] == pytest.approx(1e-6 - entries)
    assert 1 + 3 <= fast["identity_runs"] <= 1 + 6 and fast["identity_spread_runs"] == 1


def test_build_resumes_without_remeasuring(resnet8, tmp_path):
    path = tmp_path / "t.csv"
    backend = make_backend(backend="torch")
    part = build_latency_table(resnet8, path, backend, timing=FAST, max_entries=3)
    assert len(part) == 3
    assert part.meta["complete"] is False and "constant_ms" not in part.meta
    full = build_latency_table(resnet8, path, backend, timing=FAST)
    lines = path.read_text().splitlines()
    # not re-measured (the finished table only adds the memory term to latency_ms)
    measured = ("min_ms", "entry_ms", "runs", "run")
    assert [[r[c] for c in measured] for r in full.rows[:3]] == [
        [r[c] for c in measured] for r in part.rows
    ]
    assert len(full) == len(build_space(resnet8.chain).options)
    assert len(set(full.keys())) == len(full)
    runs = [r["run"] for r in full.rows]
    assert len(set(runs[:3])) == 1 and runs[3] != runs[0] and len(set(runs[3:])) == 1
    assert "constant_ms" in full.meta
    # a finished table is left alone
    again = build_latency_table(resnet8, path, backend, timing=FAST)
    assert path.read_text().splitlines() == lines
    assert again.meta["constant_ms"] == full.meta["constant_ms"]


def test_resuming_with_other_settings_is_refused(resnet8, tmp_path):
    path = tmp_path / "t.csv"
    build_latency_table(resnet8, path, make_backend(backend="torch"), timing=FAST, max_entries=1)
    with pytest.raises(TableError, match="batch_size"):
        build_latency_table(resnet8, path, make_backend(backend="torch", batch_size=2), timing=FAST)


def test_killed_cli_build_resumes_each_row_exactly_once(resnet8, tmp_path):
    """Kill `layermerge latency` mid-run, rerun it: every option once, the rows of
    the first run byte-identical, the rest measured by the second run only."""
    out = tmp_path / "lat.csv"
    driver = (
        "import argparse, sys\n"
        "from layermerge.cli.latency import register\n"
        "p = argparse.ArgumentParser(); register(p.add_subparsers())\n"
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))\n"
    )
    # a huge --min-runs makes every entry run to its 0.3 s cap: slow enough to kill
    cmd = [sys.executable, "-c", driver, "latency", "layermerge:resnet8", "--backend", "torch"]
    cmd += ["--out", str(out), "--max-time", "0.3", "--min-runs", "1000000", "--no-progress"]
    cmd += ["--no-constant", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if out.exists() and out.read_text().count("\n") >= 4:  # header + 3 rows
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    before = [ln for ln in out.read_text().splitlines(keepends=True) if ln.endswith("\n")]
    n_before = len(before) - 1
    overhead = json.loads(meta_path(out).read_text())["call_overhead_ms"]
    total = len(build_space(resnet8.chain).options)
    assert 3 <= n_before < total

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == total
    after = out.read_text().splitlines(keepends=True)
    assert after[: len(before)] == before
    table = read_table(out, "latency")
    assert sorted(table.keys()) == sorted(o.key for o in build_space(resnet8.chain).options)
    first = {r["run"] for r in table.rows[:n_before]}
    second = {r["run"] for r in table.rows[n_before:]}
    assert len(first) == 1 and len(second) == 1 and first != second
    assert json.loads(meta_path(out).read_text())["call_overhead_ms"] == overhead


# ----------------------------------------------------------------------------- settings


def test_tables_measured_under_other_settings_are_refused(torch_table, tmp_path):
    same = {**make_backend(backend="torch").meta(), "statistic": "min"}
    check_settings(torch_table, same)
    with pytest.raises(TableError, match="threads"):
        check_settings(torch_table, {**same, "threads": 2})
    with pytest.raises(TableError, match="backend"):
        check_settings(torch_table, {**same, "backend": "onnxruntime:CPUExecutionProvider"})

    rows = [dict(r) for r in torch_table.rows]
    half = len(rows) // 2
    a = write_table(tmp_path / "a.csv", "latency", rows[:half], torch_table.meta)
    b = write_table(
        tmp_path / "b.csv", "latency", rows[half:], {**torch_table.meta, "device_name": "other"}
    )
    with pytest.raises(TableError, match="device_name"):
        read_latency_tables([a, b])
    c = write_table(
        tmp_path / "c.csv", "latency", rows[half:], {**torch_table.meta, "batch_size": 8}
    )
    # the solver's own loader refuses them too
    with pytest.raises(TableError, match="batch_size"):
        concat_tables([read_table(a), read_table(c)])


def test_predict_refuses_plans_from_other_models_and_settings(resnet8, torch_table):
    space = build_space(resnet8.chain)
    imp = make_table(
        "importance",
        [
            {k: r[k] for k in ("start", "end", "kernel", "stride", "depthwise", "kept_convs")}
            | {"importance": 1.0}
            for r in torch_table.rows
        ],
        {"model_fingerprint": torch_table.model_fingerprint, "chain_length": 6},
    )
    plan = solve_tables(torch_table, imp, budget_frac=2.0).plan
    assert predict_latency(torch_table, plan) == pytest.approx(plan.meta["predicted_latency_ms"])
    plan.meta["latency_settings"]["batch_size"] = 8
    with pytest.raises(TableError, match="batch_size"):
        predict_latency(torch_table, plan)
    other = space.plan(space.identity_plan().blocks)
    other.model_fingerprint = "0" * 16
    with pytest.raises(PlanError, match="fingerprint"):
        predict_latency(torch_table, other)


# ----------------------------------------------------------------------------- backends


def test_backend_settings_are_validated():
    with pytest.raises(BackendError, match="onnxruntime setting"):
        BackendSettings(backend="torch", providers=("CPUExecutionProvider",))
    with pytest.raises(BackendError, match="unknown backend"):
        BackendSettings(backend="tensorflow")
    with pytest.raises(BackendError, match="not available"):
        make_backend(backend="onnxruntime", providers=("NoSuchExecutionProvider",))
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="CUDA"):
            make_backend(backend="torch", device="cuda")
    meta = make_backend(backend="torch", compile=True).meta()
    assert meta["backend"] == "torch.compile" and meta["compile"] is True


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_backends_pin_threads_only_while_measuring(name):
    """A backend runs PyTorch on its thread count inside a session and leaves the
    caller's count alone outside it: training between two measurements (importance,
    fine-tuning) keeps every core."""
    torch.set_num_threads(2)
    backend = make_backend(backend=name, threads=1)
    assert torch.get_num_threads() == 2
    with backend.session():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), backend.session():
        raise RuntimeError("a failed measurement")
    assert torch.get_num_threads() == 2


def test_onnxruntime_runs_the_exported_module_exactly():
    import onnxruntime as ort

    backend = make_backend(backend="onnxruntime", batch_size=2)
    meta = backend.meta()
    assert meta["backend"] == "onnxruntime:CPUExecutionProvider"
    assert meta["providers"] == ["CPUExecutionProvider"] and meta["batch_size"] == 2
    assert meta["exporter"] in ("legacy", "dynamo") and "onnxruntime" in meta["versions"]
    m = nn.Sequential(nn.Conv2d(16, 32, 5, padding=2), nn.ReLU6()).eval()
    sess = ort.InferenceSession(backend.export(m, (16, 12, 12)))
    x = backend.example((16, 12, 12))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert y.shape == (2, 32, 12, 12)
    assert torch.allclose(torch.from_numpy(y), m(x).detach(), atol=1e-5)
    run, layout_ms = backend.prepare_entry(m, (16, 12, 12))
    run()
    assert layout_ms >= 0
    # the layout time is read from calls made as the timed ones are: each after the
    # cache eviction (a reorder reading a cold input takes about twice as long)
    calls = []
    _, layout_ms = backend.prepare_entry(m, (16, 12, 12), before_call=lambda: calls.append(1))
    assert len(calls) == _PROFILED_CALLS and layout_ms > 0


def test_onnxruntime_table(resnet8, tmp_path):
    t = build_latency_table(
        resnet8, tmp_path / "ort.csv", make_backend(backend="onnxruntime"), timing=FAST
    )
    assert len(t) == len(build_space(resnet8.chain).options)
    assert t.meta["backend"] == "onnxruntime:CPUExecutionProvider"
    assert all(r["latency_ms"] >= 0 and r["layout_ms"] >= 0 for r in t.rows)
    assert predict_latency(t, build_space(resnet8.chain).identity_plan()) == pytest.approx(
        t.meta["identity_ms"] - t.meta.get("constant_raw_ms", 0.0)
    )


# ---------------------------------------------------------------------------- benchmark


def test_benchmark_times_both_networks_and_predicts(resnet8, torch_table):
    space = build_space(resnet8.chain, conv_weights(resnet8))
    plan = space.deepest_plan()
    res = benchmark(
        resnet8, plan, make_backend(backend="torch"), table=torch_table, rounds=2, calls_per_round=2
    )
    assert res.baseline_ms > 0 and res.compressed_ms > 0
    assert res.speedup == pytest.approx(res.baseline_ms / res.compressed_ms)
    assert res.predicted_ms == pytest.approx(predict_latency(torch_table, plan))
    exact = torch_table.meta["identity_ms"] - torch_table.meta.get("constant_raw_ms", 0.0)
    assert res.predicted_baseline_ms == pytest.approx(exact)
    assert res.baseline.runs == 4 and res.settings["statistic"] == "min"
    alone = benchmark(resnet8, None, make_backend(backend="torch"), rounds=2, calls_per_round=1)
    assert alone.compressed_ms is None and alone.speedup is None
    with pytest.raises(TableError, match="threads"):
        benchmark(resnet8, plan, make_backend(backend="torch", threads=2), table=torch_table)


def _cli(argv):
    from layermerge.cli.latency import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_benchmark_cli_prints_json(resnet8, torch_table, tmp_path, capsys):
    space = build_space(resnet8.chain, conv_weights(resnet8))
    plan_path = space.deepest_plan().save(tmp_path / "plan.json")
    argv = ["benchmark", "layermerge:resnet8", "--plan", str(plan_path), "--backend", "torch"]
    argv += [
        "--latency",
        str(torch_table.path),
        "--rounds",
        "2",
        "--calls-per-round",
        "1",
        "--json",
    ]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speedup"] == pytest.approx(out["baseline_ms"] / out["compressed_ms"])
    assert out["predicted_ms"] > 0 and out["settings"]["backend"] == "torch"
    from layermerge.cli import UserError

    with pytest.raises(UserError, match="threads"):
        _cli(argv[:-1] + ["--threads", "2"])
