"""8-bit against fp16 scale/zero (policy.meta), per byte, on SmolLM2-135M.

For each average code width, the calibrated layout `edgekv export` would ship (same
calibration and KL selection) and the uniform one, with fp16 metadata and with 8-bit
metadata, all run in lockstep with the fp16 cache of the same window over the same
evaluation tokens: mean KL of the next-token distributions and Δppl, beside the bits each
element really costs and the whole cache's ratio to fp16 bytes. Widths 3.5 with u8 and
3 with fp16 cost the same bytes (4.02 vs 4.00 bits per element), as do 2.5 u8 and 2 fp16.

    .venv/bin/python bench/metadata.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,2.5,3,3.5,4")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--rotation", default="hadamard", choices=["none", "hadamard"])
    ap.add_argument("--json", default="bench/results/metadata-smollm2.json")
    args = ap.parse_args()

    from edgekv.allocation import uniform_pair
    from edgekv.calibration import calibrated_policy, measure
    from edgekv.export.model_loading import load_model
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE, evaluation_text
    from edgekv.reference.model import ReferenceModel, kv_shape

    loaded = load_model("default")
    model, shape = loaded.model, kv_shape(loaded.model.config)
    n = shape.num_layers
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    geometry = dict(window=1024, sinks=4, block=32, group=32, rotation=args.rotation)
    layouts = []  # (meta, target, layout name, policy)
    t0 = time.perf_counter()
    for meta in ("fp16", "u8"):
        base = CachePolicy.uniform(n, 3, meta=meta, **geometry)
        sens = measure(model, loaded.tokenizer, base)
        for target in (float(b) for b in args.bits.split(",")):
            bk, bv = uniform_pair(target)
            layouts.append((meta, target, "uniform", base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n)))
            if target > min(sens.widths):  # at the lowest width every layout is uniform
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=sens)
                layouts.append((meta, target, f"calibrated ({record['selection']['chosen']})", policy))
    calibration_s = time.perf_counter() - t0
    fp16 = ReferenceModel(model, CachePolicy.uniform(n, 16, **geometry))
    t0 = time.perf_counter()
    scores = divergences(fp16, [ReferenceModel(model, p) for *_, p in layouts], ids, sequences=args.sequences)
    rows = [{"meta": meta, "target": target, "layout": name, "kl": d.kl, "ppl": d.ppl_test,
             "reference_ppl": d.ppl_reference, "delta_pct": d.delta_pct,
             "bits_per_element": p.bits_per_element(shape), "fp16_ratio": p.fp16_ratio(shape),
             "bits_k": list(p.bits_k), "bits_v": list(p.bits_v)}
            for (meta, target, name, p), d in zip(layouts, scores)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": len(ids), "sequences": args.sequences,
        "geometry": geometry, "calibration_seconds": calibration_s,
        "evaluation_seconds": time.perf_counter() - t0, "rows": rows}, indent=2))
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}\n")
    print("| metadata | average code bits | layout | bits/element | × fp16 bytes | KL vs fp16 | Δppl |\n"
          "|---|---:|---|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["bits_per_element"], r["meta"], r["layout"])):
        print(f"| {r['meta']} | {r['target']:g} | {r['layout']} | {r['bits_per_element']:.2f} | "
              f"{r['fp16_ratio']:.3f} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
