"""Query-aware key rounding (edgekv.key_feedback) against round-to-nearest, on SmolLM2-135M.

For each average code width: the uniform layout and the calibrated one (`edgekv export`'s
calibration, allocation and KL selection, calibrated clip ratios), once with keys rounded
to the nearest code and once with error feedback (step matrices fitted on the calibration
queries; the sensitivities, clip ratios and layout are measured with the same rounding).
Everything runs in lockstep with the fp16 cache of the same window over the same evaluation
tokens (never the calibration text): mean KL of the next-token distributions and Δppl.
Feedback costs no cache bytes: the format and bits/element are unchanged.

    .venv/bin/python bench/key_rounding.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
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
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--layouts", default="uniform,calibrated")
    ap.add_argument("--json", default="bench/results/key-rounding-smollm2.json")
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
    geometry = dict(window=args.window, sinks=4, block=32, group=32, rotation="hadamard", meta="u8")
    base = CachePolicy.uniform(n, 3, **geometry)
    t0 = time.perf_counter()
    sens = {"nearest": measure(model, loaded.tokenizer, base, feedback=False),
            "feedback": measure(model, loaded.tokenizer, base)}
    layouts = []  # (target, layout, rounding, policy)
    kinds = args.layouts.split(",")
    for target in (float(b) for b in args.bits.split(",")):
        bk, bv = uniform_pair(target)
        for rounding, s in sens.items():
            if "uniform" in kinds:
                layouts.append((target, "uniform", rounding, base.with_(
                    bits_k=(bk,) * n, bits_v=(bv,) * n, clip=s.clip, key_feedback=s.key_feedback)))
            if "calibrated" in kinds and target > min(s.widths):
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=s)
                layouts.append((target, f"calibrated ({record['selection']['chosen']})", rounding, policy))
    calibration_s = time.perf_counter() - t0
    fp16 = ReferenceModel(model, CachePolicy.uniform(n, 16, **geometry))
    t0 = time.perf_counter()
    scores = divergences(fp16, [ReferenceModel(model, p) for *_, p in layouts], ids, sequences=args.sequences)
    rows = [{"target": target, "layout": name, "rounding": rounding, "kl": d.kl, "ppl": d.ppl_test,
             "reference_ppl": d.ppl_reference, "delta_pct": d.delta_pct,
             "bits_per_element": p.bits_per_element(shape), "fp16_ratio": p.fp16_ratio(shape),
             "bits_k": list(p.bits_k), "bits_v": list(p.bits_v), "clip": [list(c) for c in p.clip]}
            for (target, name, rounding, p), d in zip(layouts, scores)]
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({
        "model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": len(ids), "sequences": args.sequences,
        "geometry": geometry, "calibration": {k: s.meta for k, s in sens.items()},
        "clip_chosen": {k: [list(c) for c in s.clip] for k, s in sens.items()},
        "calibration_seconds": calibration_s, "evaluation_seconds": time.perf_counter() - t0,
        "rows": rows}, indent=2))
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}; measure() took "
          + ", ".join(f"{k} {s.meta['seconds']:.1f} s" for k, s in sens.items()))
    print("\n| average code bits | layout | key rounding | bits/element | × fp16 bytes | KL vs fp16 | Δppl |\n"
          "|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['target']:g} | {r['layout']} | {r['rounding']} | {r['bits_per_element']:.2f} | "
              f"{r['fp16_ratio']:.3f} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
