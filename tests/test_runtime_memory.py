"""Memory stays flat over a long stream and below the plan (slow: ~20k tokens)."""

import json

import pytest

from edgekv.policy import CachePolicy

try:
    from runtime_helpers import make_bundle, run_without_torch
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import make_bundle, run_without_torch

pytestmark = pytest.mark.slow

TOKENS, WARMUP, EVERY = 20_000, 2_000, 500


def test_rss_flat_over_a_long_stream(tiny_model, tiny_model_dir, tmp_path):
    policy = CachePolicy.uniform(2, 3, window=64, sinks=4, block=8, group=8)
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    # In a torch-free process, so RSS is the runtime's own.
    code = f"""
import json
from edgekv.runtime import Engine
from edgekv.runtime.engine import current_rss, peak_rss
e = Engine.load({str(bundle)!r})
samples, n = [], 0
gen = e.generate("Once upon a time " * 20, max_new_tokens={TOKENS}, ignore_eos=True, temperature=0.8, seed=0)
for piece in gen:
    n += 1
    if n % {EVERY} == 0:
        samples.append((e.state.seen, current_rss()))
s = e.last_stats
print(json.dumps({{"samples": samples, "peak": peak_rss(), "plan": e.plan.total, "tokens": s.new_tokens,
                  "tok_s": s.tokens_per_s, "kv": s.kv_bytes, "blocks": e.state.blocks_pushed}}))
"""
    r = run_without_torch(code, timeout=1800)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["tokens"] == TOKENS and out["blocks"] > 2000  # the ring wrapped ~300 times
    rss = [m for seen, m in out["samples"] if seen >= WARMUP]
    growth = max(rss) - rss[0]
    print(f"RSS after warm-up {rss[0] / 2**20:.1f} MiB, growth over {TOKENS - WARMUP} tokens "
          f"{growth / 2**10:.0f} KiB, peak {out['peak'] / 2**20:.1f} MiB (plan {out['plan'] / 2**20:.1f} MiB), "
          f"{out['tok_s']:.0f} tok/s")
    assert growth < 1 << 20
    assert out["peak"] <= out["plan"]
