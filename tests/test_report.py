"""Report writing: JSON schema and Markdown rows from given numbers, figures exist."""

import json

from layermerge import build_space, load_model, trace
from layermerge.report import write_report


def test_report_files(tmp_path):
    chain = trace(load_model("layermerge:resnet8").model, (3, 16, 16)).chain
    space = build_space(chain)
    plans = [("layermerge@0.5", space.deepest_plan()), ("kim23@0.5", space.identity_plan())]
    rows = [
        {
            "method": m,
            "budget_frac": 0.5,
            "predicted_ms": 1.0,
            "objective": 3.0,
            "measured_ms": 1.1,
            "speedup": 1.5,
            "measured_ms_by_backend": {"onnxruntime": 1.1},
            "speedup_by_backend": {"onnxruntime": 1.5},
            "accuracy": acc,
            "params": 1000,
            "kept_activations": 3,
            "kept_convs": 6,
            "merged_blocks": 2,
        }
        for m, acc in (("layermerge", 90.0), ("kim23", 89.0))
    ]
    report = {
        "model": "layermerge:resnet8",
        "data": "fashion-mnist",
        "input_shape": [3, 16, 16],
        "primary_backend": "onnxruntime",
        "chain_length": chain.length,
        "base": {"accuracy": 91.0, "latency_ms": {"onnxruntime": 1.65}, "params": 2000},
        "rows": rows,
    }
    curves = {"layermerge": {"budget_ms": [0.5, 1.0, 2.0], "objective": [1.0, 3.0, 6.0]}}
    md = write_report(tmp_path, report, chain=chain, plans=plans, curves=curves)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema"] == 1 and data["base"]["accuracy"] == 91.0
    assert [r["method"] for r in data["rows"]] == ["layermerge", "kim23"]
    text = md.read_text()
    assert "| LayerMerge | 0.50 | 1.000 | 1.100 | 1.50 | 90.00 | -1.00 |" in text
    for name in ("accuracy_vs_speedup.png", "tradeoff.png", "chain.png"):
        png = (tmp_path / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
        assert f"]({name})" in text


def test_report_of_another_task_names_its_metrics_and_sections(tmp_path):
    """A task's quality columns (``metrics``) and its own sections (diffusion: FID and
    holdout loss, sample grids) through the same writer."""
    row = {
        "method": "layermerge",
        "budget_frac": 0.7,
        "predicted_ms": 2.0,
        "measured_ms_by_backend": {"torch": 2.2},
        "speedup_by_backend": {"torch": 1.4},
        "speedup": 1.4,
        "fid": 21.5,
        "val_loss": 0.051,
        "params": 900,
        "kept_activations": 4,
        "kept_convs": 9,
        "merged_blocks": 3,
    }
    report = {
        "model": "diffusers:ddpm-small",
        "input_shape": [1, 32, 32],
        "primary_backend": "torch",
        "chain_length": 12,
        "metrics": [
            {"key": "fid", "label": "FID", "digits": 3, "delta": "ΔFID"},
            {"key": "val_loss", "label": "holdout loss", "digits": 5},
        ],
        "base": {"fid": 20.0, "val_loss": 0.05, "latency_ms": {"torch": 3.1}, "params": 1000},
        "rows": [row],
        "sections": [{"title": "Samples", "text": "![base](samples_base.png)"}],
    }
    text = write_report(tmp_path, report).read_text()
    assert "| FID | ΔFID | holdout loss |" in text
    assert "| 21.500 | 1.500 | 0.05100 |" in text
    assert "- FID: 20.000" in text and "accuracy" not in text
    assert "## Samples\n\n![base](samples_base.png)" in text
    assert (tmp_path / "fid_vs_speedup.png").is_file()


def test_report_plots_quality_against_another_speedup_with_seed_error_bars(tmp_path):
    """A diffusion report: FID (mean ± SD over seeds) against the sampling speed-up
    (``speedup_key``), what each plan does in the main table, the metric's caveats
    under it."""
    rows = [
        {
            "method": m,
            "budget_frac": 0.7,
            "predicted_ms": 2.0,
            "measured_ms_by_backend": {"onnxruntime": 2.2},
            "speedup_by_backend": {"onnxruntime": 1.4},
            "speedup": 1.4,
            "sampling_speedup": sx,
            "fid": fid,
            "fid_std": 0.5,
            "seeds": 3,
            "val_loss": 0.05,
            "val_loss_std": 0.001,
            "kept_convs": 30,
            "merged_spans": spans,
            "pruned_convs": 5,
            "dropped_upsampling_convs": 2,
        }
        for m, sx, fid, spans in (("layermerge", 1.3, 21.0, 1), ("layerprune", 1.2, 22.0, 0))
    ]
    report = {
        "model": "diffusers:ddpm-small",
        "input_shape": [1, 32, 32],
        "primary_backend": "onnxruntime",
        "chain_length": 36,
        "metrics": [
            {"key": "fid", "label": "FID", "digits": 3, "delta": "ΔFID"},
            {"key": "val_loss", "label": "holdout loss", "digits": 5},
        ],
        "base": {"fid": 20.0, "val_loss": 0.05, "latency_ms": {"onnxruntime": 3.1}},
        "rows": rows,
        "speedup_key": "sampling_speedup",
        "speedup_label": "measured speed-up of whole DDIM sampling runs",
        "plan_structure": True,
        "quality_caveats": ["FID of few samples is biased upward."],
    }
    text = write_report(tmp_path, report).read_text()
    head = next(line for line in text.splitlines() if line.startswith("| method"))
    assert head.endswith("| merged spans | pruned convs | dropped up-sampling convs |")
    assert "blocks merged" not in head
    assert "| 21.000 ± 0.500 | 1.000 |" in text and "| 30/36 | 1 | 5 | 2 |" in text
    assert "seed of median FID" in text
    assert "- FID of few samples is biased upward." in text
    assert "## FID against measured sampling speed-up" in text
    png = (tmp_path / "fid_vs_speedup.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_costs_of_a_latency_table():
    """How a latency table prices merging: merged entries against their convs' own."""
    from types import SimpleNamespace

    from layermerge.pipeline.diffusion_report import merge_costs

    def row(s, e, kept, ms):
        return {"start": s, "end": e, "kept_convs": kept, "latency_ms": ms}

    table = SimpleNamespace(
        rows=[
            row(0, 1, (1,), 1.0),
            row(1, 2, (2,), 1.0),
            row(0, 2, (1, 2), 3.0),  # merged: 1.5x the two convs
            row(0, 2, (2,), 0.5),  # one conv pruned: not a merge
            row(2, 3, (3,), 2.0),
            row(3, 4, (4,), 2.0),
            row(2, 4, (3, 4), 3.0),  # merged: 0.75x
        ]
    )
    ev = merge_costs(table)
    assert ev == {"spans": 2, "cheaper": 1, "ratio_min": 0.75, "ratio_max": 1.5}
    assert merge_costs(None) is None
