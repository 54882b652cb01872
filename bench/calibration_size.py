"""Does a larger calibration make the calibrated allocation beat uniform under rotation?

With the Hadamard rotation the true per-layer sensitivities are flat and the allocator
spends 2-bit codes on the noise of its estimates (BENCHMARKS.md: calibrated 3-bit +1.09 %
vs uniform +0.40 %). This measures the sensitivities at the default size (512 tokens, 128
queries) and at a larger one, allocates 3 and 2.5 average bits from each, and scores every
layout and the uniform ones on the same evaluation text, all in one run.

    .venv/bin/python bench/calibration_size.py [--tokens 2048] [--queries 512] [--json OUT]
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--json", default="bench/results/calibration-size-smollm2.json")
    args = ap.parse_args()

    from edgekv.allocation import allocate
    from edgekv.calibration import DEFAULT_QUERIES, DEFAULT_TOKENS, measure
    from edgekv.export.model_loading import load_model
    from edgekv.policy import CachePolicy
    from edgekv.quality.perplexity import perplexity
    from edgekv.quality.text import evaluation_text
    from edgekv.reference.model import ReferenceModel

    loaded = load_model("default")
    n = loaded.model.config.num_hidden_layers
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    base = CachePolicy.uniform(n, 3, window=1024, sinks=4, block=32, group=32, rotation="hadamard")
    rows = []

    def score(label, policy, extra=None):
        t0 = time.perf_counter()
        ppl = perplexity(ReferenceModel(loaded.model, policy), ids, sequences=args.sequences).ppl
        rows.append({"setting": label, "ppl": ppl, "bits_k": list(policy.bits_k), "bits_v": list(policy.bits_v),
                     "seconds": time.perf_counter() - t0, **(extra or {})})
        print(rows[-1]["setting"], round(ppl, 3), flush=True)

    score("fp16", base.with_(bits_k=(16,) * n, bits_v=(16,) * n, rotation="none"))
    score("uniform 3-bit", base)
    score("uniform K3/V2", base.with_(bits_v=(2,) * n))
    for tokens, queries in ((DEFAULT_TOKENS, DEFAULT_QUERIES), (args.tokens, args.queries)):
        sens = measure(loaded.model, loaded.tokenizer, base, tokens=tokens, queries=queries)
        for target in (3.0, 2.5):
            a = allocate(sens, target)
            p = base.with_(bits_k=a.bits_k, bits_v=a.bits_v)
            score(f"calibrated {target:g}-bit, {sens.meta['tokens']} tokens / {sens.meta['queries']} queries", p,
                  {"predicted_loss": sens.predicted_loss(p.bits_k, p.bits_v), "calibration": sens.meta})
    ref = rows[0]["ppl"]
    for r in rows:
        r["delta_pct"] = 100 * (r["ppl"] / ref - 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"tokens": len(ids), "sequences": args.sequences, "rows": rows}, indent=2))
    print("| setting (rotation on) | ppl | Δppl |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['ppl']:.3f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
