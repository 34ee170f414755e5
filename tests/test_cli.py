"""The inspect and verify commands: stable JSON keys, files, human output, exit codes."""

import json
import subprocess
import sys

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
