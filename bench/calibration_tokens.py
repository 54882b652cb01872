"""Does the shipped calibration (512 tokens) leave accuracy on the table at low widths?

Measures the sensitivities of the shipped defaults (rotation, u8s meta, u8hr residual,
clipping, key feedback, value groups) from the calibration text at the default size and
at larger ones, lets `calibrated_policy` allocate and select a layout from each exactly as
`edgekv export` does (selection on the 1,024 calibration tokens after the ones measured),
and scores every layout against one fp16 run on the evaluation text (never calibrated on).

    .venv/bin/python bench/calibration_tokens.py [--tokens 512,2048] [--bits 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="512,2048", help="calibration sizes (queries scale with them)")
    ap.add_argument("--bits", default="2", help="average code widths")
    ap.add_argument("--max-tokens", type=int, default=6144)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--json", default="bench/results/calibration-tokens-smollm2.json")
    args = ap.parse_args()

    from edgekv.calibration import DEFAULT_QUERIES, DEFAULT_TOKENS, calibrated_policy, coarse_group, measure
    from edgekv.export.model_loading import load_model
    from edgekv.policy import DEFAULT_META, DEFAULT_RESIDUAL, CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import evaluation_text
    from edgekv.reference.model import ReferenceModel, kv_shape

    loaded = load_model("default")
    model, tok = loaded.model, loaded.tokenizer
    n = model.config.num_hidden_layers
    ids = tok(evaluation_text()).input_ids[:args.max_tokens]
    base = CachePolicy.uniform(n, 2, window=1024, sinks=4, block=32, group=32, rotation="hadamard",
                               meta=DEFAULT_META, residual=DEFAULT_RESIDUAL)
    layouts = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        t0 = time.perf_counter()
        sens = measure(model, tok, base, tokens=tokens, queries=DEFAULT_QUERIES * tokens // DEFAULT_TOKENS,
                       coarse_group=coarse_group(base, model, True))
        secs = time.perf_counter() - t0
        for bits in (float(b) for b in args.bits.split(",")):
            policy, alloc = calibrated_policy(model, tok, base, bits, sens=sens, value_groups=True)
            sel = alloc.get("selection") or {}
            layouts.append(({"calibration_tokens": sens.meta["tokens"], "queries": sens.meta["queries"],
                             "bits": bits, "measure_seconds": round(secs, 1), "chosen": sel.get("chosen"),
                             "selection_kl": {c["name"]: c["kl"] for c in sel.get("candidates", [])},
                             "bits_k": list(policy.bits_k), "bits_v": list(policy.bits_v),
                             "groups_v": list(policy.groups_v),
                             "fp16_ratio": policy.fp16_ratio(kv_shape(model.config))}, policy))
            print(f"{tokens} tokens, {bits:g} bits: chose {sel.get('chosen')} ({secs:.0f} s to measure)", flush=True)
    fp16 = ReferenceModel(model, base.fp16_equivalent())
    results = divergences(fp16, [ReferenceModel(model, p) for _, p in layouts], ids, sequences=args.sequences)
    rows = []
    for (row, _), d in zip(layouts, results):
        row.update(kl=d.kl, delta_pct=d.delta_pct, delta_pct_se=d.delta_pct_se)
        rows.append(row)
    Path(args.json).write_text(json.dumps({"tokens": len(ids), "sequences": args.sequences, "rows": rows}, indent=2))
    print("| bits | calibration tokens | chosen | × fp16 | KL | Δppl |\n|---|---:|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['bits']:g} | {r['calibration_tokens']} | {r['chosen']} | {r['fp16_ratio']:.4f} | "
              f"{r['kl']:.4f} | {r['delta_pct']:+.2f} ± {r['delta_pct_se']:.2f} % |")


if __name__ == "__main__":
    main()
