"""Decode speed of the kernel backend (onnxruntime segments + fused TVM attention) against
the onnxruntime backend on the same bundle, measured in the same run.

    .venv/bin/python bench/kernel_backend.py BUNDLE [--prompt 1100] [--gen 64] [--repeat 3]
        [--json bench/results/kernel-backend-smollm2.json]

Each backend loads the bundle in turn, warms up, then per repeat: reset, prefill the
prompt (the ring full and evicting: a prompt past the window), decode --gen tokens
greedily. Reports median decode tok/s, TTFT, the ratio ort+tvm / ort, how many greedy
tokens the two agree on, and the perplexity of the prompt's second half fed one decode step
at a time through each backend (teacher-forced: the quality check that does not depend on
where two greedy streams first part).
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path


def measure(bundle: str, backend: str, prompt: list[int], gen: int, repeat: int, threads: int | None) -> dict:
    from edgekv.runtime import Engine

    t0 = time.perf_counter()
    eng = Engine.load(bundle, backend=backend, threads=threads)
    load_s = time.perf_counter() - t0
    list(eng.generate_tokens(prompt[:40], 8, ignore_eos=True))  # warm thread pools and arenas
    rates, ttfts, toks = [], [], []
    for _ in range(repeat):
        eng.reset()
        stamps, out = [time.perf_counter()], []
        for tok in eng.generate_tokens(prompt, gen, ignore_eos=True):
            stamps.append(time.perf_counter())
            out.append(tok)
        ttfts.append(stamps[1] - stamps[0])
        rates.append((len(out) - 1) / (stamps[-1] - stamps[1]))
        toks = out
    nll = teacher_forced_nll(eng, prompt)
    return {"backend": backend, "load_s": load_s, "nll": nll, "decode_tok_s": statistics.median(rates),
            "decode_tok_s_all": rates, "ttft_s": statistics.median(ttfts), "tokens": toks}


def teacher_forced_nll(eng, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[k+1] given ids[:k+1] over the second half of
    `ids`, every step a decode step (the path the kernel replaces)."""
    import numpy as np

    eng.reset()
    half = len(ids) // 2
    list(eng.generate_tokens(ids[:half], 1, ignore_eos=True))  # prefill the first half
    st, be, total = eng.state, eng.backend, 0.0
    for k in range(half, len(ids) - 1):
        st.prepare(1)
        logits = be.run([ids[k]], 1).astype(np.float64)
        st.append(*be.new_kv(1), 1, be.pack)
        m = logits.max()
        total += m + np.log(np.exp(logits - m).sum()) - logits[ids[k + 1]]
    eng.reset()
    return total / (len(ids) - 1 - half)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--prompt", type=int, default=1100, help="prompt tokens (past the window: the ring evicts)")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default="bench/results/kernel-backend-smollm2.json")
    args = ap.parse_args()

    from edgekv.quality.text import evaluation_text
    from edgekv.runtime.tokenizer import BundleTokenizer

    tok = BundleTokenizer(Path(args.bundle))
    ids = tok.encode(evaluation_text())[:args.prompt]
    rows = [measure(args.bundle, b, ids, args.gen, args.repeat, args.threads) for b in ("ort", "ort+tvm")]
    base, kern = rows
    agree = sum(a == b for a, b in zip(base["tokens"], kern["tokens"]))
    result = {"bundle": args.bundle, "prompt": len(ids), "gen": args.gen, "repeat": args.repeat, "rows": rows,
              "decode_ratio": kern["decode_tok_s"] / base["decode_tok_s"],
              "ttft_ratio": kern["ttft_s"] / base["ttft_s"], "greedy_agree": agree,
              "ppl_ratio": math.exp(kern["nll"] - base["nll"])}
    for r in rows:
        print(f"{r['backend']:8s} decode {r['decode_tok_s']:6.2f} tok/s  TTFT {r['ttft_s']:.2f} s  load {r['load_s']:.1f} s")
    print(f"ort+tvm / ort: decode {result['decode_ratio']:.2f}x, TTFT {result['ttft_ratio']:.2f}x; "
          f"greedy tokens agree {agree}/{args.gen}; teacher-forced perplexity over the prompt's second "
          f"half {math.exp(base['nll']):.3f} vs {math.exp(kern['nll']):.3f} ({result['ppl_ratio']:.4f}x)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
