"""The runtime on real SmolLM2-135M bundles against ReferenceModel (slow).

ReferenceModel's greedy sequence is checked by teacher forcing: one reference forward
over prompt + the runtime's tokens gives the logits every greedy step would see (the
reference is chunking-exact), so "argmax at every step == the runtime's token" is
"ReferenceModel.generate returns the same tokens", at a fraction of its decode cost.

Exact equality holds at 8 bits (and 16). At 3 and 4 bits it does not over a 1,100-token
prompt: fp32 summation-order differences between onnxruntime and torch flip fp16
roundings, and low-bit codes amplify the flips layer after layer (the test driver and the
runtime, on the same graphs, diverge just as much). There the test asks for agreement on
most steps instead (measured: 29/32 at 3 bits, 28/32 at 4 bits).
"""

import json

import pytest
import torch

from edgekv.policy import CachePolicy
from edgekv.quality.text import evaluation_text
from edgekv.reference.model import ReferenceModel
from edgekv.runtime import Engine

try:
    from runtime_helpers import run_without_torch
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import run_without_torch

pytestmark = pytest.mark.slow

NEW_TOKENS, PROMPT = 32, 1100
AGREE_GGUF = 0.8
NEAR_TIE = 1.0  # logits (SmolLM2's span ~40): a step that differs must be a near-tie


def _policy(bits):
    return CachePolicy.uniform(30, bits, window=1024, sinks=4, block=32, group=32)


@pytest.fixture(scope="module")
def smol_bundle(smollm2, tmp_path_factory):
    from edgekv.export.bundle import ExportOptions, write_bundle

    made = {}

    def get(bits, dtype="fp32"):
        if (bits, dtype) not in made:
            out = tmp_path_factory.mktemp(f"smol{bits}{dtype}") / "bundle"
            write_bundle(smollm2, _policy(bits), out, ExportOptions(prefill_chunk=32, weights_dtype=dtype))
            made[bits, dtype] = out
        return made[bits, dtype]
    return get


def _run_and_reference(smollm2, path, bits, backend="ort"):
    engine = Engine.load(path, backend=backend)
    ids = engine.tokenizer.encode(evaluation_text())[:PROMPT]  # > window: eviction in prefill
    got = list(engine.generate_tokens(ids, NEW_TOKENS, ignore_eos=True))
    ref = ReferenceModel(smollm2.model, _policy(bits))
    cache = ref.new_cache()
    logits = ref.forward(torch.tensor([ids + got]), cache)[0, len(ids) - 1:-1]
    assert cache.blocks_pushed > cache.ring_slots
    s = engine.last_stats
    print(f"{bits}-bit: runtime TTFT {s.ttft_s:.1f} s, {s.tokens_per_s:.2f} tok/s")
    return got, logits.argmax(-1).tolist(), logits


def test_greedy_equals_reference_after_a_long_prompt(smollm2, smol_bundle):
    got, expect, _ = _run_and_reference(smollm2, smol_bundle(8), 8)
    assert got == expect


def test_kernel_backend_greedy_equals_reference(smollm2, smol_bundle):
    """backend ort+tvm (the fused TVM kernel for decode attention) on SmolLM2's geometry
    (9 query / 3 KV heads, head_dim 64, window 1024): the same exact greedy sequence."""
    pytest.importorskip("tvm")
    got, expect, _ = _run_and_reference(smollm2, smol_bundle(8), 8, backend="ort+tvm")
    assert got == expect


def test_3bit_tracks_reference(smollm2, smol_bundle):
    got, expect, _ = _run_and_reference(smollm2, smol_bundle(3), 3)
    agree = sum(a == b for a, b in zip(got, expect))
    print(f"3-bit: teacher-forced agreement {agree}/{NEW_TOKENS}")
    assert got[0] == expect[0] and agree >= 0.8 * NEW_TOKENS


def test_gguf_weights_track_reference(smollm2, smol_bundle):
    """--dtype gguf: the same weights (the GGUF's blocks, exact) with int8 activations in
    the matmuls. With an 8-bit cache the only difference left is those activations."""
    path = smol_bundle(8, "gguf")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["graphs"]["quantized_weights"] == {"q4_1": 210, "q8_0": 1}
    assert (path / "weights.bin").stat().st_size < 0.25 * (smol_bundle(8) / "weights.bin").stat().st_size
    got, expect, logits = _run_and_reference(smollm2, path, 8)
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    missed = [(i, round(margins[i], 3)) for i, (a, b) in enumerate(zip(got, expect)) if a != b]
    print(f"gguf weights, 8-bit cache: teacher-forced agreement {NEW_TOKENS - len(missed)}/{NEW_TOKENS}; "
          f"differing steps (step, reference top-2 margin): {missed}")
    assert len(missed) <= (1 - AGREE_GGUF) * NEW_TOKENS
    assert all(m < NEAR_TIE for _, m in missed)


def test_gguf_bundle_has_a_cuda_kernel_for_every_node(smol_bundle):
    """The shipped weight format (MatMulNBits, 8-bit embedding blocks) and every graph of
    a 3-bit bundle stay on onnxruntime's CUDA provider (export/cuda_coverage.py)."""
    from edgekv.export.cuda_coverage import bundle_fallbacks

    found = bundle_fallbacks(smol_bundle(3, "gguf"))
    assert len(found) == 3 and {g: dict(m) for g, m in found.items() if m} == {}


@pytest.mark.parametrize("dtype", ["fp32", "gguf"])
def test_torch_free_process_memory_below_plan(smol_bundle, dtype):
    path = smol_bundle(3, dtype)
    code = f"""
import json
from edgekv.runtime import Engine
from edgekv.runtime.engine import peak_rss
e = Engine.load({str(path)!r})
text = "".join(e.generate("The history of the hacker culture " * 100, max_new_tokens={NEW_TOKENS}, ignore_eos=True))
s = e.last_stats
print(json.dumps({{"peak": peak_rss(), "plan": e.plan.total, "parts": e.plan.parts, "tok_s": s.tokens_per_s,
                  "ttft": s.ttft_s, "prompt": s.prompt_tokens}}))
"""
    r = run_without_torch(code, timeout=1800)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"torch-free runtime: prompt {out['prompt']} tokens, TTFT {out['ttft']:.1f} s, "
          f"{out['tok_s']:.2f} tok/s, peak RSS {out['peak'] / 2**20:.0f} MiB, plan {out['plan'] / 2**20:.0f} MiB "
          f"({', '.join(f'{k} {v / 2**20:.0f}' for k, v in out['parts'].items())})")
    assert out["peak"] <= out["plan"]
