"""BENCHMARKS.md accuracy-methods tables (issue 8), reference backend, SmolLM2-135M.

Part 1, codecs: each ring codec (edgekv.methods) at several code widths against the fp16
cache with the same window, run in lockstep over the same tokens: mean KL divergence of
the next-token distributions (the stable ranking, edgekv.quality.divergence) and the
perplexity delta, with the bits each element really costs (code + fp16 scale/zero + the
method's own extras). Codebooks are fitted on the calibration text only.

Part 2, eviction: the sliding window against H2O heavy-hitter eviction at equal bytes (the
same ring slots), with a window short enough that most of each sequence is read after
eviction, both against the fp16 cache that keeps every token; sequences run one at a time
(each evicts its own blocks).

    .venv/bin/python bench/methods.py [--codecs uniform:2,outliers:2,...] [--eviction-window 256]
"""

import argparse
import json
import math
import time
from pathlib import Path

DEFAULT_CODECS = ("uniform:2,outliers:2,codebook:2,uniform:3/2,uniform:3,outliers:3,codebook:3,"
                  "uniform:4,codebook:4")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--rotation", default="hadamard", choices=["none", "hadamard"])
    ap.add_argument("--codecs", default=DEFAULT_CODECS,
                    help="codec:K[/V] bits, comma-separated ('' skips part 1)")
    ap.add_argument("--outlier-fraction", type=float, default=0.01)
    ap.add_argument("--salient", default="2:2,2:4,3:2",
                    help="salient-token rows, bits:kept tokens per block, comma-separated ('' skips)")
    ap.add_argument("--eviction-window", type=int, default=256, help="0 skips part 2")
    ap.add_argument("--eviction-bits", default="16,3")
    ap.add_argument("--recent", default="0.5,0.25", help="H2O's always-kept recent fraction(s)")
    ap.add_argument("--json", default="bench/results/methods-smollm2.json")
    args = ap.parse_args()
    import torch

    from edgekv.export.model_loading import load_model
    from edgekv.methods import CODECS, OutlierCodec
    from edgekv.methods.codec_cache import fit_codec, method_model
    from edgekv.methods.heavy_hitters import HeavyHitterCache
    from edgekv.methods.salient import SalientTokenCache
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergence
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE, evaluation_text
    from edgekv.reference.model import kv_shape

    torch.manual_seed(0)
    loaded = load_model("default")
    model, shape = loaded.model, kv_shape(loaded.model.config)
    n = shape.num_layers
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    result = {"model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": len(ids),
              "sequences": args.sequences, "rotation": args.rotation, "codecs": [], "eviction": []}

    def policy(bk, bv, window=1024):
        return CachePolicy.uniform(n, bits_k=bk, bits_v=bv, window=window, sinks=4, block=32, group=32,
                                   rotation=args.rotation)

    def score(reference, test, per_sequence=False) -> dict:
        """KL and perplexities of `test` against `reference` over the evaluation tokens."""
        if per_sequence:
            m = len(ids) // args.sequences
            parts = [divergence(reference, test, ids[i * m:(i + 1) * m]) for i in range(args.sequences)]
        else:
            parts = [divergence(reference, test, ids, sequences=args.sequences)]
        mean = lambda f: sum(f(p) for p in parts) / len(parts)  # noqa: E731  equal lengths
        ppl_ref = math.exp(mean(lambda p: math.log(p.ppl_reference)))
        ppl = math.exp(mean(lambda p: math.log(p.ppl_test)))
        return {"kl": mean(lambda p: p.kl), "ppl": ppl, "reference_ppl": ppl_ref,
                "delta_pct": 100 * (ppl / ppl_ref - 1)}

    codecs = {}

    def codec(name):
        if name not in codecs:
            c = OutlierCodec(args.outlier_fraction) if name == "outliers" else CODECS[name]()
            codecs[name] = fit_codec(c, model, loaded.tokenizer, policy(2, 2))
        return codecs[name]

    specs = [s for s in args.codecs.split(",") if s]
    if specs:
        fp16 = method_model(model, policy(16, 16))
        for spec in specs:
            name, bits = spec.split(":")
            bk, bv = (int(b) for b in bits.split("/")) if "/" in bits else (int(bits),) * 2
            t0 = time.perf_counter()
            c, pol = codec(name), policy(bk, bv)
            row = {"codec": name, "bits_k": bk, "bits_v": bv, **score(fp16, method_model(model, pol, c)),
                   "average_bits": pol.average_bits(),
                   "bits_per_element": pol.bits_per_element(shape) + c.extra_bits(shape.head_dim),
                   "seconds": time.perf_counter() - t0}
            result["codecs"].append(row)
            print(row, flush=True)

    for spec in (s for s in args.salient.split(",") if s):
        bits, keep = (int(x) for x in spec.split(":"))
        t0 = time.perf_counter()
        pol = policy(bits, bits)
        row = {"codec": f"salient tokens ({keep}/block exact)", "bits_k": bits, "bits_v": bits,
               **score(method_model(model, policy(16, 16)),
                       method_model(model, pol, cache_class=SalientTokenCache, keep=keep), per_sequence=True),
               "average_bits": pol.average_bits(),
               "bits_per_element": pol.bits_per_element(shape) + keep / pol.block * (16 - bits),
               "seconds": time.perf_counter() - t0}
        result["codecs"].append(row)
        print(row, flush=True)

    if args.eviction_window:
        w = args.eviction_window
        full = method_model(model, policy(16, 16, window=None))
        for bits in (int(b) for b in args.eviction_bits.split(",")):
            pol = policy(bits, bits, window=w)
            rows = [("sliding window", None)] + [(f"H2O, recent {r}", float(r)) for r in args.recent.split(",")]
            for label, recent in rows:
                t0 = time.perf_counter()
                kw = {} if recent is None else {"cache_class": HeavyHitterCache, "recent": recent}
                row = {"eviction": label, "bits": bits, "window": w,
                       **score(full, method_model(model, pol, **kw), per_sequence=True),
                       "seconds": time.perf_counter() - t0}
                result["eviction"].append(row)
                print(row, flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print_tables(result)


def print_tables(r: dict) -> None:
    if r["codecs"]:
        print(f"\nfp16 cache, same window: ppl {r['codecs'][0]['reference_ppl']:.3f}\n")
        print("| codec | K/V bits | bits/element incl. metadata | KL vs fp16 (nats/token) | ppl | Δppl |\n"
              "|---|---|---:|---:|---:|---:|")
        for c in r["codecs"]:
            print(f"| {c['codec']} | {c['bits_k']}/{c['bits_v']} | {c['bits_per_element']:.2f} | "
                  f"{c['kl']:.5f} | {c['ppl']:.3f} | {c['delta_pct']:+.2f} % |")
    if r["eviction"]:
        print(f"\nfp16 cache keeping every token: ppl {r['eviction'][0]['reference_ppl']:.3f}\n")
        print("| eviction | bits | window | KL vs full fp16 | ppl | Δppl vs full fp16 |\n|---|---:|---:|---:|---:|---:|")
        for e in r["eviction"]:
            print(f"| {e['eviction']} | {e['bits']} | {e['window']} | {e['kl']:.5f} | {e['ppl']:.3f} | "
                  f"{e['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
