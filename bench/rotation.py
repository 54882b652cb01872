"""Hadamard rotation experiment (reference backend only): perplexity delta of uniform 3- and
2-bit caches with K, V or both rotated along head_dim before quantizing, each against the
fp16 cache with the same window measured in the same run.

    .venv/bin/python bench/rotation.py [--max-tokens 2048] [--sequences 2] [--json OUT]
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--bits", default="3,2")
    ap.add_argument("--json", default="bench/results/rotation-smollm2.json")
    args = ap.parse_args()
    import torch

    from edgekv.export.model_loading import load_model
    from edgekv.policy import CachePolicy
    from edgekv.quality.perplexity import perplexity
    from edgekv.quality.text import evaluation_text
    from edgekv.reference.model import ReferenceModel
    from edgekv.rotation import hadamard

    loaded = load_model("default")
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    n = loaded.model.config.num_hidden_layers
    h = torch.from_numpy(hadamard(loaded.model.config.head_dim))
    rows = []

    def run(bits, rotate):
        ref = ReferenceModel(loaded.model, CachePolicy.uniform(n, bits))
        orig = ref.new_cache

        def new_cache(*a, **k):
            c = orig(*a, **k)
            c.rotation = {side: h for side in rotate}
            return c
        ref.new_cache = new_cache
        t0 = time.perf_counter()
        ppl = perplexity(ref, ids, sequences=args.sequences).ppl
        rows.append({"bits": bits, "rotate": "".join(rotate) or "none", "ppl": ppl,
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)

    run(16, ())
    base = rows[0]["ppl"]
    for bits in [int(b) for b in args.bits.split(",")]:
        for rotate in ((), ("k",), ("v",), ("k", "v")):
            run(bits, rotate)
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / base - 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tokens": len(ids), "sequences": args.sequences, "rows": rows}, indent=2))
    print("| bits | rotated | ppl | Δppl vs fp16 W1024 |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['bits']} | {r['rotate']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
