"""Calibrated vs uniform bit layouts, ranked by KL divergence from the fp16 cache.

BENCHMARKS.md found the calibrated allocation worse than uniform under the Hadamard
rotation by perplexity delta (+1.09 % vs +0.40 % at 3 bits) and that the gap moved with
the calibration sample. This asks whether the layouts really differ or the perplexity
deltas are noise: every layout is run in lockstep with the fp16 cache of the same window
over the same evaluation tokens, scoring the mean KL of the next-token distributions as
well as Δppl. Layouts: every candidate `edgekv export` considers (edgekv.layout_selection:
the plain allocation, the allocation from sensitivities shrunk halfway to the mean, and
uniform), marked with the one export chooses by KL on held-out calibration tokens.

    .venv/bin/python bench/layouts_kl.py [--max-tokens 4096] [--sequences 4] [--json OUT]
"""

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--bits", default="2.5,3,4")
    ap.add_argument("--rotation", default="none,hadamard")
    ap.add_argument("--fisher", default="sampled", help="comma list of edgekv.calibration.FISHER_KINDS")
    ap.add_argument("--json", default="bench/results/layouts-kl-smollm2.json")
    args = ap.parse_args()

    from edgekv.calibration import calibrated_policy, measure
    from edgekv.export.model_loading import load_model
    from edgekv.layout_selection import candidates
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE, evaluation_text
    from edgekv.reference.model import ReferenceModel, kv_shape

    loaded = load_model("default")
    model = loaded.model
    n = model.config.num_hidden_layers
    shape = kv_shape(model.config)
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    rows = []
    fp16 = ReferenceModel(model, CachePolicy.uniform(n, 16, window=1024, sinks=4, block=32, group=32))
    for rotation, fisher in ((r, f) for r in args.rotation.split(",") for f in args.fisher.split(",")):
        base = CachePolicy.uniform(n, 3, window=1024, sinks=4, block=32, group=32, rotation=rotation)
        sens = measure(model, loaded.tokenizer, base, fisher=fisher)
        for target in (float(b) for b in args.bits.split(",")):
            chosen, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=sens)
            held_out = {c["name"]: c["kl"] for c in record["selection"]["candidates"]}
            cands = candidates(sens, base, target)
            t0 = time.perf_counter()
            scores = divergences(fp16, [ReferenceModel(model, p) for p in cands.values()], ids,
                                 sequences=args.sequences)
            for (name, policy), d in zip(cands.items(), scores):
                rows.append({"rotation": rotation, "fisher": fisher, "target": target, "layout": name,
                             "chosen": (policy.bits_k, policy.bits_v) == (chosen.bits_k, chosen.bits_v),
                             "selection_kl": held_out.get(name), "kl": d.kl,
                             "ppl": d.ppl_test, "reference_ppl": d.ppl_reference, "delta_pct": d.delta_pct,
                             "bits_per_element": policy.bits_per_element(shape),
                             "predicted_loss": sens.predicted_loss(policy.bits_k, policy.bits_v),
                             "bits_k": list(policy.bits_k), "bits_v": list(policy.bits_v),
                             "seconds": time.perf_counter() - t0})
                print({k: rows[-1][k] for k in ("rotation", "fisher", "target", "layout", "chosen", "selection_kl", "kl",
                                                 "delta_pct")}, flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"model": loaded.source, "text": DEFAULT_TEXT_SOURCE,
                                           "tokens": len(ids), "sequences": args.sequences, "rows": rows},
                                          indent=2))
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}\n")
    print("| rotation | Fisher | average bits | layout | KL on held-out calibration | KL on evaluation text | Δppl |\n"
          "|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        name = f"**{r['layout']}** (chosen)" if r["chosen"] else r["layout"]
        print(f"| {r['rotation']} | {r['fisher']} | {r['target']:g} | {name} | {r['selection_kl']:.5f} | {r['kl']:.5f} | "
              f"{r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
