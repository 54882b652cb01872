"""`--dtype gguf` vs fp32 weights on SmolLM2-135M: perplexity through the exported bundles
(the onnxruntime runtime, token by token through the compressed cache), bundle size and
resident memory, in one run. The weights are the same numbers (the GGUF's blocks, read
exactly); what differs is MatMulNBits' int8 activations and its kernels.

    .venv/bin/python bench/gguf_weights.py [--bits 3] [--tokens 1024] [--json OUT]

Speed is measured by `edgekv profile FP32_BUNDLE GGUF_BUNDLE` (the command is printed).
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def bundle_ppl(path: Path, ids: list[int]) -> tuple[float, float]:
    """Perplexity of ids[1:] fed one token at a time (decode graph), and the seconds taken."""
    from edgekv.runtime import Engine

    engine = Engine.load(path, threads=2)
    nll, t0 = 0.0, time.perf_counter()
    for i in range(len(ids) - 1):
        logits = engine._feed([ids[i]]).astype(np.float64)  # noqa: SLF001 - scoring needs every step's logits
        m = logits.max()
        nll += m + math.log(np.exp(logits - m).sum()) - logits[ids[i + 1]]
    return math.exp(nll / (len(ids) - 1)), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="3")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="bundles/gguf-bench")
    ap.add_argument("--json", default="bench/results/gguf-weights-smollm2.json")
    args = ap.parse_args()
    from edgekv.cli import main as edgekv
    from edgekv.quality.text import evaluation_text
    from edgekv.runtime.tokenizer import BundleTokenizer

    rows = []
    for dtype in ("fp32", "gguf"):
        out = Path(args.out) / f"{args.bits}bit-{dtype}"
        if not (out / "manifest.json").exists():
            assert edgekv(["export", "default", "--bits", args.bits, "--bits-layout", "uniform",
                           "--dtype", dtype, "-o", str(out), "--force"]) == 0
        ids = BundleTokenizer(out).encode(evaluation_text())[:args.tokens]
        ppl, secs = bundle_ppl(out, ids)
        rows.append({"dtype": dtype, "bundle": str(out), "ppl": ppl, "seconds": secs,
                     "weights_bytes": (out / "weights.bin").stat().st_size})
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["delta_ppl_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
        r["weights_ratio"] = r["weights_bytes"] / base["weights_bytes"]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"bits": args.bits, "tokens": args.tokens, "rows": rows}, indent=2))
    print("| weights | ppl | Δppl vs fp32 weights | weights.bin MiB | × fp32 |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.2f} % | "
              f"{r['weights_bytes'] / 2**20:.1f} | {r['weights_ratio']:.3f} |")
    print(f"speed: .venv/bin/edgekv profile {rows[0]['bundle']} {rows[1]['bundle']} --prompt-lens 1024,4096 --gen 64")


if __name__ == "__main__":
    main()
