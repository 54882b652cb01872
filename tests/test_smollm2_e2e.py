"""End-to-end on the embedded SmolLM2-135M (slow: marked, run in CI)."""

import json

import pytest
import torch

from edgekv.cli import main
from edgekv.policy import CachePolicy
from edgekv.quality.passkey import run_trial
from edgekv.quality.text import evaluation_text
from edgekv.reference.model import ReferenceModel

pytestmark = pytest.mark.slow


def test_16_bit_cache_reproduces_smollm2_logits(smollm2):
    ids = smollm2.tokenizer(evaluation_text()[:3000], return_tensors="pt").input_ids[:, :300]
    with torch.no_grad():
        expect = smollm2.model(ids).logits
    ref = ReferenceModel(smollm2.model, CachePolicy.uniform(30, 16, window=None))
    got = ref.forward(ids, ref.new_cache())
    # fp16 rounding of K/V only; SmolLM2 logits span ~40, the difference stays below 0.05.
    assert (got - expect).abs().max() < 0.05
    assert (got.argmax(-1) == expect.argmax(-1)).float().mean() > 0.99


def test_passkey_inside_and_beyond_the_window(smollm2):
    ref = ReferenceModel(smollm2.model, CachePolicy.uniform(30, 4, window=256, sinks=4))
    inside = run_trial(ref, smollm2.tokenizer, length=400, depth=0.8, key="48213")
    beyond = run_trial(ref, smollm2.tokenizer, length=400, depth=0.1, key="48213")
    assert inside.distance < 256 < beyond.distance
    assert inside.found and not beyond.found


def test_eval_cli_on_default_model(tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "default", "--bits", "4,2", "--bits-layout", "uniform", "--window", "256",
                 "--max-tokens", "768",
                 "--passkey-lengths", "", "--json", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    fp16 = rows["fp16 W256"]
    b4, b2 = (rows[f"{b}-bit W256 hadamard meta u8s residual u8hr"] for b in (4, 2))
    assert 5 < fp16["ppl"] < 200
    assert abs(b4["delta_pct"]) < abs(b2["delta_pct"]) and b2["delta_pct"] > 1.0
