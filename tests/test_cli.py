import json
import subprocess
import sys

import pytest

from edgekv import __version__
from edgekv.cli import main


def _run(*args):
    return subprocess.run([sys.executable, "-m", "edgekv.cli", *args], capture_output=True, text=True)


def test_help_and_version():
    r = _run("--help")
    assert r.returncode == 0 and "eval" in r.stdout
    r = _run("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = _run("eval", "--help")
    assert r.returncode == 0 and "--window" in r.stdout and "default: 1024" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["eval", "/no/such/model"], "does not exist"),
    (["eval", "default", "--bits", "7.5", "--bits-layout", "uniform"], "bits for keys must be one of"),
    (["eval", "default", "--bits", "0.5"], "calibrated average must lie in"),
    (["eval", "default", "--window", "1000"], "multiple of block"),
    (["eval", "default", "--text", "/no/such.txt"], "text file"),
])
def test_bad_input_is_one_clear_line(args, msg, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and err.count("\n") == 1


def test_eval_runs_on_a_tiny_model_directory(tmp_path, tiny_model_dir):
    """End to end through the CLI on a tiny model with a character-level tokenizer."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "r.json"
    assert main(["eval", str(tiny_model_dir), "--bits", "4,2", "--bits-layout", "uniform",
                 "--window", "64", "--block", "8",
                 "--group", "8", "--text", str(text), "--max-tokens", "300", "--sequences", "2",
                 "--passkey-lengths", "", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["fp16 W64", "4-bit W64 hadamard meta u8s residual u8hr",
                                            "2-bit W64 hadamard meta u8s residual u8hr"]
    assert rows[0]["delta_pct"] == 0.0 and rows[2]["fp16_ratio"] < rows[1]["fp16_ratio"] < 1.0
    assert all(r["ppl"] > 1.0 for r in rows)
    # KL from the fp16 cache: none for the fp16 row, more damage at 2 bits than at 4.
    assert rows[0]["kl"] is None and 0.0 < rows[1]["kl"] < rows[2]["kl"]


def _eval_tiny(tmp_path, model_dir, *args) -> dict:
    """`edgekv eval` of the tiny model on short text, window 64, block/group 8: row 1."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    out = tmp_path / "r.json"
    assert main(["eval", str(model_dir), "--window", "64", "--block", "8", "--group", "8", "--text", str(text),
                 "--max-tokens", "200", "--passkey-lengths", "", "--json", str(out), *args]) == 0
    return json.loads(out.read_text())["rows"][1]


def test_eval_calibrated_rows_carry_their_allocation(tmp_path, tiny_model_dir):
    row = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "2.5", "--meta", "fp16", "--residual", "fp16",
                     "--value-groups", "fixed", "--head-widths", "off")
    assert row["setting"] == "calibrated 2.5-bit W64 hadamard" and len(row["bits_k"]) == 2
    assert row["average_bits"] == sum(row["bits_k"] + row["bits_v"]) / 4 <= 2.5
    assert row["bits_per_element"] == row["average_bits"] + 4  # fp16 scale + zero per 8
    assert row["predicted_delta_pct"] is not None


def test_eval_kv_ratio_evaluates_what_export_would_pick(tmp_path, tiny_model_dir):
    from edgekv.allocation import average_for_fp16_ratio
    from edgekv.policy import CachePolicy, KVShape

    row = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "16", "--kv-ratio", "0.4", "--value-groups", "fixed",
                     "--head-widths", "off")
    base = CachePolicy.uniform(2, 2, window=64, sinks=4, block=8, group=8, rotation="hadamard", meta="u8s",
                               residual="u8hr")
    assert row["setting"] == "calibrated 0.4x fp16 W64 hadamard meta u8s residual u8hr"
    assert row["fp16_ratio"] <= 0.4 and row["average_bits"] <= average_for_fp16_ratio(base, KVShape(2, 2, 16), 0.4)
    assert main(["eval", str(tiny_model_dir), "--kv-ratio", "0.4", "--bits-layout", "uniform"]) == 2


def test_eval_clip_none_keeps_min_max_grids(tmp_path, tiny_model_dir):
    row = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "2", "--clip", "none")
    assert " min/max" in row["setting"] and row["clip"] == []


def test_eval_key_rounding(tmp_path, tiny_model_dir):
    assert _eval_tiny(tmp_path, tiny_model_dir, "--bits", "3")["key_rounding"] == "feedback"
    row = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "3", "--key-rounding", "nearest")
    assert " nearest" in row["setting"] and row["key_rounding"] == "nearest"


def test_eval_u8_residual_row_against_an_fp16_baseline(tmp_path, tiny_model_dir):
    """The fp16 row stays all-fp16 (the baseline); the quantized row stores its sinks and
    residual in 8 bits and costs fewer bytes than with an fp16 residual, and fewer with one
    scale/zero per token and head (u8h) than per group (u8)."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    ratios = []
    for residual in ("fp16", "u8", "u8h"):
        out = tmp_path / f"{residual}.json"
        assert main(["eval", str(tiny_model_dir), "--window", "64", "--block", "8", "--group", "8", "--text", str(text),
                     "--max-tokens", "200", "--passkey-lengths", "", "--bits", "3", "--bits-layout", "uniform",
                     "--residual", residual, "--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert rows[0]["setting"] == "fp16 W64" and rows[0]["fp16_ratio"] == 1.0
        ratios.append(rows[1]["fp16_ratio"])
    assert rows[1]["setting"] == "3-bit W64 hadamard meta u8s residual u8h" and 0 < ratios[2] < ratios[1] < ratios[0]


def test_eval_value_groups_row(tmp_path, tiny_model_dir):
    fixed = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "3", "--value-groups", "fixed")
    row = _eval_tiny(tmp_path, tiny_model_dir, "--bits", "3")  # calibrated groups (and head widths) are the default
    assert row["setting"].endswith(" value groups per head") and set(row["groups_v"]) <= {8, 16}
    assert fixed["groups_v"] == [] and row["fp16_ratio"] <= fixed["fp16_ratio"] + 1e-12
