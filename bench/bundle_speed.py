"""Decode speed and TTFT of bundles that differ in one thing (metadata format, graph
operators, ...), loaded in one process and measured in alternation, so machine noise hits
all alike.

    .venv/bin/python bench/bundle_speed.py NAME=BUNDLE NAME=BUNDLE [...] [--backend auto]
        [--prompt 1100] [--gen 64] [--rounds 4] [--json OUT]

Per round and bundle: reset, prefill a prompt past the window (the ring full and evicting),
decode --gen tokens greedily; reports median decode tok/s and TTFT per bundle and their
ratios to the first bundle's.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+", help="NAME=PATH; the first is the baseline of the ratios")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", type=int, default=1100)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default="bench/results/bundle-speed-smollm2.json")
    args = ap.parse_args()
    named = [b.split("=", 1) for b in args.bundles]
    if len(named) < 2 or any(len(n) != 2 for n in named):
        ap.error("give two or more bundles as NAME=PATH")

    from edgekv.quality.text import evaluation_text
    from edgekv.runtime import Engine

    engines = {name: Engine.load(path, backend=args.backend) for name, path in named}
    base = named[0][0]
    prompt = engines[base].tokenizer.encode(evaluation_text())[:args.prompt]
    stats = {name: {"rates": [], "ttfts": []} for name in engines}
    for name, eng in engines.items():  # warm thread pools and arenas
        list(eng.generate_tokens(prompt[:40], 8, ignore_eos=True))
    for _ in range(args.rounds):
        for name, eng in engines.items():
            eng.reset()
            stamps = [time.perf_counter()]
            for _tok in eng.generate_tokens(prompt, args.gen, ignore_eos=True):
                stamps.append(time.perf_counter())
            stats[name]["ttfts"].append(stamps[1] - stamps[0])
            stats[name]["rates"].append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    result = {name: {"backend": engines[name].backend.name, "decode_tok_s": statistics.median(s["rates"]),
                     "ttft_s": statistics.median(s["ttfts"]), **s} for name, s in stats.items()}
    for name in engines:
        r = result[name]
        r["decode_ratio"] = r["decode_tok_s"] / result[base]["decode_tok_s"]
        r["ttft_ratio"] = r["ttft_s"] / result[base]["ttft_s"]
        print(f"{name}: {r['backend']}, decode {r['decode_tok_s']:.1f} tok/s ({r['decode_ratio']:.2f}x), "
              f"TTFT {r['ttft_s'] * 1000:.0f} ms ({r['ttft_ratio']:.2f}x)")
    result["settings"] = vars(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
