"""The latency model: each option is timed with what its choice decides in the deploy
network (the residual adds it keeps, its end activation), so that the constant holds
only what no plan changes. Tiny models and short timings."""

from __future__ import annotations

import json
import operator
import random
from dataclasses import replace

import pytest
import torch
from torch import fx, nn

from layermerge import build_space, load_model, trace
from layermerge.cli import main
from layermerge.families.base import OptionInContext, owned_skips
from layermerge.latency import (
    TimingConfig,
    backend_for_table,
    build_latency_table,
    check_settings,
    make_backend,
    predict_latency,
)
from layermerge.latency.constant import (
    _constant_timing,
    _fit_terms,
    apply_terms,
    plan_sums,
    reference_plan,
)
from layermerge.latency.table import (
    LATENCY_MODEL,
    block_latency_ms,
    check_latency_model,
    deploy_network,
    dropped_block,
    option_input_shapes,
    option_module,
)
from layermerge.plan import Plan
from layermerge.tables import TableError, make_table, meta_path, write_table

FAST = TimingConfig(
    warmup_runs=2, warmup_s=0.0, min_warmup_runs=1, min_runs=2, max_runs=3, max_time_s=0.01
)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def resnet8():
    lm = load_model("layermerge:resnet8")
    return trace(lm.model, lm.input_shape)


@pytest.fixture(scope="module")
def mbv2():
    lm = load_model("torchvision:mobilenet_v2", input_shape=(3, 64, 64))
    return trace(lm.model, lm.input_shape)


def _onnx_ops(module: nn.Module, shapes) -> list[str]:
    import onnx

    backend = make_backend(backend="onnxruntime")
    model = onnx.load_from_string(backend.export(module, shapes))
    return [n.op_type for n in model.graph.node]


def _option(traced, s, e):
    """The option of block (s, e] that keeps the most convs."""
    return max(build_space(traced.chain).options_of(s, e), key=lambda o: len(o.kept_convs))


def test_an_option_owning_a_surviving_add_is_timed_with_it(resnet8):
    chain = resnet8.chain
    sk = next(k for k in chain.skips if k.projection is None)  # (0, 2) in resnet8
    owner = _option(resnet8, sk.end - 1, sk.end)  # starts after the skip: the add stays
    assert owned_skips(chain, owner) == [sk]
    module = option_module(resnet8, owner)
    assert isinstance(module, OptionInContext) and len(module.skips) == 1
    shapes = option_input_shapes(resnet8, owner)
    assert shapes == (tuple(chain.nodes[owner.start].shape), tuple(chain.nodes[sk.start].shape))
    ops = _onnx_ops(module, shapes)
    assert ops.count("Conv") == 1 and "Add" in ops and ops[-1] == "Relu"
    # the add happens after the conv and before the end activation
    assert ops.index("Conv") < ops.index("Add") < ops.index("Relu")


def test_an_owned_projection_skip_brings_its_conv(resnet8):
    chain = resnet8.chain
    sk = next(k for k in chain.skips if k.projection is not None)
    owner = _option(resnet8, sk.end - 1, sk.end)
    shapes = option_input_shapes(resnet8, owner)
    assert shapes[1] == tuple(chain.nodes[sk.start].shape)
    ops = _onnx_ops(option_module(resnet8, owner), shapes)
    assert ops.count("Conv") == 2 and "Add" in ops
    with torch.no_grad():
        y = option_module(resnet8, owner)(*(torch.zeros(1, *s) for s in shapes))
    assert tuple(y.shape[1:]) == tuple(chain.nodes[owner.end].shape)


def test_a_block_containing_the_skip_has_no_add(resnet8):
    chain = resnet8.chain
    space = build_space(chain)
    folding = [sk for sk in chain.skips if space.options_of(sk.start, sk.end)]
    assert folding
    for sk in folding:
        block = _option(resnet8, sk.start, sk.end)  # folds the skip into its kernel
        assert owned_skips(chain, block) == []
        module = option_module(resnet8, block)
        assert not isinstance(module, OptionInContext)
        ops = _onnx_ops(module, option_input_shapes(resnet8, block))
        assert "Add" not in ops and ops.count("Conv") == 1


def test_a_dropped_conv_costs_its_add_and_activation(resnet8):
    chain = resnet8.chain
    sk = next(k for k in chain.skips if k.projection is None)
    module = option_module(resnet8, dropped_block(chain, sk.end))
    ops = _onnx_ops(module, option_input_shapes(resnet8, dropped_block(chain, sk.end)))
    assert "Conv" not in ops and "Add" in ops and ops[-1] == "Relu"


def _adds(net: nn.Module) -> int:
    assert isinstance(net, fx.GraphModule)
    return sum(
        1
        for n in net.graph.nodes
        if (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add))
        or (n.op == "call_method" and n.target in ("add", "add_"))
    )


@pytest.mark.parametrize("which", ["resnet8", "mbv2"])
def test_owned_adds_are_the_adds_of_the_deploy_network(which, request):
    """The residual adds the entries time are exactly those the merged network keeps."""
    traced = request.getfixturevalue(which)
    space = build_space(traced.chain)
    rng = random.Random(0)
    plans = [space.identity_plan(), space.deepest_plan()]
    plans += [space.random_plan(rng) for _ in range(3)]
    for plan in plans:
        net = deploy_network(traced, plan, verify=False)
        owned = sum(len(owned_skips(traced.chain, b)) for b in plan.blocks)
        assert _adds(net) == owned, plan.blocks


@pytest.fixture(scope="module")
def table(resnet8, tmp_path_factory):
    path = tmp_path_factory.mktemp("lat") / "resnet8.csv"
    n = torch.get_num_threads()
    t = build_latency_table(resnet8, path, make_backend(backend="torch"), timing=FAST)
    torch.set_num_threads(n)
    return t


def test_identity_prediction_is_the_measured_network(resnet8, table):
    space = build_space(resnet8.chain)
    assert table.meta["latency_model"] == LATENCY_MODEL
    # (a constant clamped at 0 on a noisy tiny network puts it constant_raw_ms above)
    exact = table.meta["identity_ms"] - table.meta.get("constant_raw_ms", 0.0)
    assert predict_latency(table, space.identity_plan()) == pytest.approx(exact)
    # adds are in the entries now: every owner's row says which skips it times
    for r in table.rows:
        o = space.option((r["start"], r["end"], r["kernel"], r["stride"], r["depthwise"]))
        want = ";".join(f"{k.start}-{k.end}" for k in owned_skips(resnet8.chain, o))
        assert (r["skips"] or "") == want


def test_blocks_without_activation_and_dropped_convs_have_costs(resnet8, table):
    chain = resnet8.chain
    space = build_space(chain)
    o = _option(resnet8, 0, 1)
    bare = replace(o, activation=False)
    assert block_latency_ms(table, bare) == table.row(o.key)["latency_noact_ms"]
    assert block_latency_ms(table, o) == table.row(o.key)["latency_ms"]
    dropped = table.meta["dropped_ms"]
    reducible = [i for i in range(1, chain.length + 1) if not chain.conv(i).irreducible]
    assert sorted(map(int, dropped)) == reducible
    i = reducible[0]
    plan = Plan(
        space.fingerprint,
        chain.length,
        [b if b.end != i else dropped_block(chain, i) for b in space.identity_plan().blocks],
        method="layerprune",
    )
    expect = (
        predict_latency(table, space.identity_plan())
        - table.row(space.identity_plan().blocks[i - 1].key)["latency_ms"]
    )
    assert predict_latency(table, plan) == pytest.approx(expect + dropped[str(i)])


def test_tables_of_the_older_model_are_refused_and_set_aside(resnet8, table, tmp_path):
    old = make_table("latency", table.rows, {**table.meta, "latency_model": 1}, table.columns)
    with pytest.raises(TableError, match="latency model 1"):
        check_latency_model(old)
    with pytest.raises(TableError, match="latency model 1"):
        predict_latency(old, build_space(resnet8.chain).identity_plan())
    # a build into a file of the older model measures a new table, keeping the old one
    path = tmp_path / "t.csv"
    path.write_text("start,end,kernel,stride,depthwise,kept_convs,latency_ms\n")
    meta = {k: v for k, v in table.meta.items() if k != "latency_model"}
    meta_path(path).write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="measured again"):
        t = build_latency_table(
            resnet8, path, make_backend(backend="torch"), timing=FAST, max_entries=1,
            constant=False,
        )  # fmt: skip
    assert t.meta["latency_model"] == LATENCY_MODEL and len(t) == 1
    assert (tmp_path / "t.model1.csv").exists()


def test_the_constant_fit_recovers_the_slowdown_and_memory_terms():
    c, slowdown, beta = 0.4, 0.1, 0.25  # ms, share of the entries, ms per million weights
    nets = {"identity": (10.0, 3.0), "pruned": (6.0, 1.0), "merged": (2.0, 2.5), "half": (5, 2)}
    points = {k: (c + slowdown * e + beta * w, e, w) for k, (e, w) in nets.items()}
    fit = _fit_terms(points, ["slowdown", "beta"])
    assert fit == pytest.approx({"constant": c, "slowdown": slowdown, "beta": beta})
    # a term that would come out below 0 is noise: left out, the rest fitted again
    points = {k: (c + slowdown * e - beta * w, e, w) for k, (e, w) in nets.items()}
    fit = _fit_terms(points, ["slowdown", "beta"])
    assert (
        fit["beta"] == 0.0 and fit["slowdown"] > 0 and set(fit) == {"constant", "slowdown", "beta"}
    )
    # with as few terms as fit as well: a network time that does not grow with the
    # entries or the weights is all constant
    points = {k: (c, e, w) for k, (e, w) in nets.items()}
    assert _fit_terms(points, ["slowdown", "beta"]) == pytest.approx(
        {"constant": c, "slowdown": 0.0, "beta": 0.0}
    )


def test_the_terms_scale_the_rows_that_run_a_conv():
    meta = {"slowdown": 0.1, "memory_ms_per_mweight": 0.5}
    conv = {"kept_convs": (1,), "entry_ms": 2.0, "latency_ms": 2.0, "weights": 2e6}
    conv |= {"latency_noact_ms": 1.5, "entry_noact_ms": None}  # as read from a new table
    empty = {"kept_convs": (), "entry_ms": 0.3, "latency_ms": 0.3, "weights": 0}
    rows = apply_terms([conv, empty], meta)
    assert rows[0]["latency_ms"] == pytest.approx(1.1 * 2.0 + 1.0)
    assert rows[0]["latency_noact_ms"] == pytest.approx(1.1 * 1.5 + 1.0)
    assert rows[0]["entry_noact_ms"] == 1.5  # as measured, for the next fit
    assert rows[1]["latency_ms"] == 0.3  # runs no conv: as measured
    # applying them again starts from the measured values, not from the last result
    assert apply_terms(rows, meta) == rows


def test_the_reference_plans_span_the_methods(resnet8, table):
    space = build_space(resnet8.chain)
    ident = plan_sums(table, space.identity_plan())
    plan = reference_plan(table, space, "layermerge", 0.5)
    assert plan is not None and plan.method == "layermerge"
    half = plan_sums(table, plan)
    assert half.entries + half.fixed < ident.entries + ident.fixed
    assert len(plan.blocks) < len(space.identity_plan().blocks)
    kim = reference_plan(table, space, "kim23", 0.0)
    assert kim is not None and kim.method == "kim23"
    fastest = plan_sums(table, kim)
    assert fastest.entries + fastest.fixed <= ident.entries + ident.fixed + 1e-12
    # a block that removes its activation is summed with its entry without it
    blocks = list(space.identity_plan().blocks)
    row = table.row(blocks[0].key)
    noact = space.plan([replace(blocks[0], activation=False), *blocks[1:]], method="kim23")
    got = plan_sums(table, noact).entries
    assert got == pytest.approx(ident.entries - row["entry_ms"] + row["entry_noact_ms"])
    assert row["entry_noact_ms"] != row["entry_ms"]
    # the sidecar records the fit: the terms, and each reference network's time
    assert "slowdown" in table.meta and table.meta["slowdown"] >= 0
    assert any(table.meta.get(f"{n}_ms") for n in ("merged", "merged_half", "noact"))
    assert table.meta["latency_model"] == LATENCY_MODEL == 4


def test_whole_networks_are_timed_without_cache_eviction():
    # the constant's network is timed as plans and `layermerge benchmark` time
    # networks: back to back, no eviction (that only emulates a layer's context)
    for t in (TimingConfig(flush_mb=4.0), TimingConfig.reference()):
        assert _constant_timing(t).flush_mb == 0.0
    assert _constant_timing(TimingConfig(flush_mb=4.0)).min_runs >= 30


def test_backend_for_table_times_networks_as_the_table_was(table):
    backend = backend_for_table(table)
    assert backend.settings.backend == "torch" and backend.settings.threads == 1
    check_settings(table, {**backend.meta(), "statistic": table.meta["statistic"]})


def test_solve_measure_prints_each_prediction_beside_its_measurement(
    resnet8, table, tmp_path, capsys
):
    space = build_space(resnet8.chain)
    imp = make_table(
        "importance",
        [k | {"importance": 1.0} for k in space.option_rows()],
        space.table_meta(),
    )
    write_table(tmp_path / "imp.csv", "importance", imp.rows, imp.meta)
    lat = table.path
    line = (
        f"solve --latency {lat} --importance {tmp_path}/imp.csv --budget-frac 1.0 --top 2 "
        f"--out {tmp_path}/plan.json --measure layermerge:resnet8 --measure-rounds 2"
    )
    assert main([*line.split(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    measured = out["measured"]
    tops = {f"top {i}" for i in range(2, len(out["top"]) + 1)}
    assert set(measured) == {"unmodified", "plan"} | tops
    plan = Plan.load(tmp_path / "plan.json")
    assert measured["plan"]["predicted_ms"] == pytest.approx(predict_latency(table, plan))
    assert measured["unmodified"]["predicted_ms"] == pytest.approx(
        predict_latency(table, space.identity_plan())
    )
    for m in measured.values():
        assert m["measured_ms"] > 0 and m["calls"] >= 2
        assert m["error"] == pytest.approx(m["predicted_ms"] / m["measured_ms"] - 1)
    assert main(line.split()) == 0
    text = capsys.readouterr().out
    assert "measured on torch" in text and "predicted" in text and "speed-up" in text
    # another model than the table's is refused, naming why
    bad = line.replace("layermerge:resnet8", "layermerge:resnet20")
    assert main(bad.split()) != 0
    assert "fingerprint" in capsys.readouterr().err
