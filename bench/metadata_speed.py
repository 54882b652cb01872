"""Decode speed of two bundles that differ only in their metadata (fp16 vs u8 scale/zero),
loaded in one process and measured in alternation, so machine noise hits both alike.

    .venv/bin/python bench/metadata_speed.py FP16_BUNDLE U8_BUNDLE [--backend auto] [--prompt 1100]
        [--gen 64] [--rounds 4] [--json OUT]

Per round and bundle: reset, prefill a prompt past the window (the ring full and evicting),
decode --gen tokens greedily; reports median decode tok/s and TTFT per bundle and the
ratio u8 / fp16.
"""

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp16_bundle")
    ap.add_argument("u8_bundle")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--prompt", type=int, default=1100)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default="bench/results/metadata-speed-smollm2.json")
    args = ap.parse_args()

    from edgekv.quality.text import evaluation_text
    from edgekv.runtime import Engine

    engines = {name: Engine.load(path, backend=args.backend)
               for name, path in (("fp16", args.fp16_bundle), ("u8", args.u8_bundle))}
    prompt = engines["fp16"].tokenizer.encode(evaluation_text())[:args.prompt]
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
    result["ratio_u8_over_fp16"] = result["u8"]["decode_tok_s"] / result["fp16"]["decode_tok_s"]
    result["settings"] = vars(args)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    for name in engines:
        r = result[name]
        print(f"{name}: {r['backend']}, decode {r['decode_tok_s']:.1f} tok/s, TTFT {r['ttft_s'] * 1000:.0f} ms")
    print(f"u8 / fp16 decode: {result['ratio_u8_over_fp16']:.2f}x")


if __name__ == "__main__":
    main()
