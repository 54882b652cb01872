"""Calibrated range clipping (edgekv.clipping) against plain min/max grids, on SmolLM2-135M.

For each average code width: the uniform layout and the calibrated one (`edgekv export`'s
calibration, allocation and KL selection), each with plain min/max grids (sensitivities
measured with ratio 1 only) and with the clip ratios calibration picks per side and width.
Everything runs in lockstep with the fp16 cache of the same window over the same evaluation
tokens (never the calibration text): mean KL of the next-token distributions and Δppl.
Clipping costs no bytes: the format and bits/element are unchanged.

    .venv/bin/python bench/clipping.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
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
    ap.add_argument("--meta", default="u8", choices=["fp16", "u8"])
    ap.add_argument("--json", default="bench/results/clipping-smollm2.json")
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
    geometry = dict(window=1024, sinks=4, block=32, group=32, rotation="hadamard", meta=args.meta)
    base = CachePolicy.uniform(n, 3, **geometry)
    t0 = time.perf_counter()
    sens = {"min/max": measure(model, loaded.tokenizer, base, clips=(1.0,)),
            "clipped": measure(model, loaded.tokenizer, base)}
    layouts = []  # (target, layout, grid, policy)
    for target in (float(b) for b in args.bits.split(",")):
        bk, bv = uniform_pair(target)
        for grid, s in sens.items():
            layouts.append((target, "uniform", grid, base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n, clip=s.clip)))
            if target > min(s.widths):
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=s)
                layouts.append((target, f"calibrated ({record['selection']['chosen']})", grid, policy))
    calibration_s = time.perf_counter() - t0
    fp16 = ReferenceModel(model, CachePolicy.uniform(n, 16, **geometry))
    t0 = time.perf_counter()
    scores = divergences(fp16, [ReferenceModel(model, p) for *_, p in layouts], ids, sequences=args.sequences)
    rows = [{"target": target, "layout": name, "grid": grid, "kl": d.kl, "ppl": d.ppl_test,
             "reference_ppl": d.ppl_reference, "delta_pct": d.delta_pct,
             "bits_per_element": p.bits_per_element(shape), "fp16_ratio": p.fp16_ratio(shape),
             "bits_k": list(p.bits_k), "bits_v": list(p.bits_v), "clip": [list(c) for c in p.clip]}
            for (target, name, grid, p), d in zip(layouts, scores)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": len(ids), "sequences": args.sequences,
        "geometry": geometry, "clip_chosen": [list(c) for c in sens["clipped"].clip],
        "calibration_seconds": calibration_s, "evaluation_seconds": time.perf_counter() - t0,
        "rows": rows}, indent=2))
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}; clip ratios chosen: "
          + ", ".join(f"{s}{b}:{r:g}" for s, b, r in sens["clipped"].clip))
    print("\n| average code bits | layout | grid | bits/element | × fp16 bytes | KL vs fp16 | Δppl |\n"
          "|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']:g} | {r['layout']} | {r['grid']} | {r['bits_per_element']:.2f} | "
              f"{r['fp16_ratio']:.3f} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
