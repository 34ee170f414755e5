"""layermerge:mobilenetv2_mini: shapes, width multiplier, the traced chain, a search
space with activation-removal (kim23) spans, and exact merging of its plans."""

import pytest
import torch

from layermerge import load_model, verify
from layermerge.solve import solve_tables
from layermerge.tables import read_table, write_table

from .helpers import prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shapes_and_width_mult():
    m = load_model("layermerge:mobilenetv2_mini", {"in_chans": 1}, input_shape="1,28,28")
    assert m.input_shape == (1, 28, 28)
    assert m.model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    wide = load_model("layermerge:mobilenetv2_mini", {"width_mult": 2.0, "num_classes": 7})
    assert wide.input_shape == (3, 28, 28)
    assert wide.model(torch.zeros(1, 3, 28, 28)).shape == (1, 7)
    assert wide.model.classifier.in_features == 2 * m.model.classifier.in_features


def test_chain_space_kim23_and_exact_merges(tmp_path):
    model = load_model("layermerge:mobilenetv2_mini", {"in_chans": 1}, input_shape="1,28,28")
    model, traced, space = prepare(model.model, (1, 28, 28))
    chain = traced.chain
    # stem and last 1x1 conv outside; 7 blocks: 2 + 3 * 6 convs, 3 identity residuals
    assert chain.length == 20
    assert len(chain.skips) == 3 and all(s.projection is None for s in chain.skips)
    assert {chain.nodes[i].activation for i in range(1, 21)} == {"relu6", None}
    assert any(chain.conv(i).depthwise for i in range(1, 21))
    # kim23 (activation removal only) has spans of several convs that keep them all
    all_kept = [o for o in space.options if o.length > 1 and len(o.kept_convs) == o.length]
    assert all_kept
    # on proxy tables (latency = multiply-adds; importance 1 - 0.01 per removed
    # activation) kim23 finds a plan faster than the unmodified network
    rows = space.option_rows()
    meta = {**space.table_meta(), "constant_ms": 0.0}

    def macs(r):
        c = chain.conv(r["kept_convs"][0]) if r["kept_convs"] else chain.conv(r["end"])
        h, w = chain.nodes[r["end"]].shape[-2:]
        dense = r["kernel"] ** 2 * c.in_channels * c.out_channels * h * w * 1e-6
        return dense / (c.groups if r["depthwise"] else 1)

    lat = read_table(
        write_table(
            tmp_path / "lat.csv", "latency", [{**r, "latency_ms": macs(r)} for r in rows], meta
        ),
        "latency",
    )
    imp_rows = [{**r, "importance": 1 - 0.01 * (r["end"] - r["start"] - 1)} for r in rows]
    imp = read_table(write_table(tmp_path / "imp.csv", "importance", imp_rows, meta), "importance")
    sol = solve_tables(lat, imp, method="kim23", budget_frac=0.99)
    assert any(b.length > 1 for b in sol.plan.blocks)
    # merging is exact: the deepest plan, the kim23 plan and a few random plans
    plans = [space.deepest_plan(), sol.plan] + [space.random_plan(k) for k in range(3)]
    res = verify(traced, plans)
    assert res["failures"] == [], res
