"""The inspect and verify commands: stable JSON keys, files, human output, exit codes."""

import json
import subprocess
import sys

import pytest

from layermerge.cli import main

from .conftest import USER_MODELS


def test_verify_json(capsys):
    rc = main(
        ["verify", f"{USER_MODELS}:plain", "--input-shape", "3,12,12", "--plans", "6", "--json"]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["plans"] == 8  # 6 random + nothing compressed + deepest
    assert out["failures"] == [] and out["max_rel_err"] <= 1e-5
    assert out["max_abs_err"] >= 0 and out["dtype"] == "float64"


def test_verify_float32_human_output(capsys):
    rc = main(
        [
            "verify",
            "layermerge:resnet8",
            "--input-shape",
            "3,16,16",
            "--plans",
            "3",
            "--dtype",
            "float32",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "5 plans in float32" in out and "OK" in out


def test_inspect_human_and_files(tmp_path, capsys):
    csv = tmp_path / "space.csv"
    chain_json = tmp_path / "chain.json"
    assert (
        main(
            [
                "inspect",
                "layermerge:resnet8",
                "--options-csv",
                str(csv),
                "--chain-json",
                str(chain_json),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "layer2.0.conv1 *" in out  # irreducible mark
    assert "stride 2 of conv 'layer2.0.conv1'" in out  # break reason
    assert "+ 2->4 proj" in out  # skip mark
    assert "chain length 6, 3 skips, 2 breaks, 7 valid blocks, 8 options" in out
    assert csv.exists() and (tmp_path / "space.csv.meta.json").exists()
    chain = json.loads(chain_json.read_text())
    assert chain["chain_length"] == 6 and len(chain["convs"]) == 6


def test_console_script_runs_as_a_module():
    r = subprocess.run(
        [sys.executable, "-m", "layermerge.cli", "inspect", "layermerge:resnet8", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(r.stdout)["options"] == 8


def test_renamed_flags_keep_their_old_names_with_a_warning(capsys):
    """--distill (was --distill-weight), --calibration (--calibration-seeds) and
    --calls-per-round (--calls) match the config keys; the old names still parse to
    the same setting and warn, and --help shows only the new ones."""
    from layermerge.cli import build_parser

    parser = build_parser()
    cases = [
        (["finetune", "layermerge:resnet8", "--plan", "p.json", "--data", "d", "--out", "o.pt"],
         "--distill", "--distill-weight", "0.5", "distill_weight", 0.5),
        (["importance", "layermerge:resnet8", "--data", "d", "--out", "I.csv"],
         "--calibration", "--calibration-seeds", "2", "calibration_seeds", 2),
        (["benchmark", "layermerge:resnet8"], "--calls-per-round", "--calls", "3", "calls", 3),
    ]  # fmt: skip
    for argv, new, old, value, dest, want in cases:
        assert getattr(parser.parse_args([*argv, new, value]), dest) == want
        assert "deprecated" not in capsys.readouterr().err
        assert getattr(parser.parse_args([*argv, old, value]), dest) == want
        assert f"{old} is deprecated and will be removed; use {new}" in capsys.readouterr().err
        with pytest.raises(SystemExit):
            parser.parse_args([argv[0], "--help"])
        shown = capsys.readouterr().out
        assert new in shown and old + " " not in shown and old + "\n" not in shown
