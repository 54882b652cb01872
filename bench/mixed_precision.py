"""BENCHMARKS.md mixed-precision table: uniform vs calibrated bit allocation on SmolLM2-135M.

One process, one model, every row against the fp16 cache with the same window measured in
the same run: average code widths 2, 2.5, 3, 4 (uniform 2.5 = K3/V2; calibrated 2 is
uniform 2 by construction, since every width is then 2), each without and with the Hadamard
rotation (--rotation). Calibrated rows are allocated as `edgekv export` allocates them.
Perplexity through the cache on
the evaluation text (calibration reads only the held-out last quarter), passkey, code bits
and bits with scale/zero per element, bytes against fp16.

    .venv/bin/python bench/mixed_precision.py [--max-tokens 2048] [--sequences 2] [--json OUT]
"""

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    # Defaults are what BENCHMARKS.md reports (2 x 1024 tokens; passkey off: the reference
    # backend decodes ~1 token/s at 1k context on 2 shared cores). --passkey-lengths 1024 adds it.
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--passkey-lengths", default="")
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    ap.add_argument("--rotation", default="none,hadamard", help="rotations to evaluate, comma-separated")
    ap.add_argument("--json", default="bench/results/mixed-precision-smollm2.json")
    args = ap.parse_args()
    from edgekv.export.model_loading import load_model
    from edgekv.quality.evaluate import EvalSetting, run_eval
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE, evaluation_text

    settings = [EvalSetting(16, 16, 1024, 4, 32, 32, "cache")]
    for rotation in args.rotation.split(","):
        geo = (1024, 4, 32, 32, "cache", rotation)
        settings += [EvalSetting(2, 2, *geo), EvalSetting(3, 2, *geo), EvalSetting(3, 3, *geo),
                     EvalSetting(4, 4, *geo), EvalSetting(2, 2, *geo, calibrated=2.5),
                     EvalSetting(2, 2, *geo, calibrated=3.0), EvalSetting(2, 2, *geo, calibrated=4.0)]
    loaded = load_model("default")
    lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    depths = [float(x) for x in args.passkey_depths.split(",") if x]
    t0 = time.perf_counter()
    rows = run_eval(loaded.model, loaded.tokenizer, settings, evaluation_text(), args.max_tokens,
                    args.sequences, lengths, depths,
                    progress=None)
    result = {"model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": args.max_tokens,
              "sequences": args.sequences, "passkey_lengths": lengths, "passkey_depths": depths,
              "seconds": time.perf_counter() - t0, "calibration": run_eval.calibration,
              "rows": [asdict(r) for r in rows]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print_table(result)


def print_table(r: dict) -> None:
    print("| setting | avg code bits | bits/element incl. scale/zero | × fp16 bytes | ppl | Δppl | "
          "predicted Δppl | passkey |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in r["rows"]:
        d = "-" if row["delta_pct"] is None else f"{row['delta_pct']:+.2f} %"
        p = "-" if row["predicted_delta_pct"] is None else f"{row['predicted_delta_pct']:+.2f} %"
        pk = "-" if row["passkey_pct"] is None else f"{row['passkey_pct']:.0f} %"
        print(f"| {row['setting']} | {row['average_bits']:.2f} | {row['bits_per_element']:.2f} | "
              f"{row['fp16_ratio']:.3f} | {row['ppl']:.3f} | {d} | {p} | {pk} |")
    for row in r["rows"]:
        if isinstance(row["bits_k"], list):
            print(f"- {row['setting']}: K {row['bits_k']}\n  V {row['bits_v']}")


if __name__ == "__main__":
    main()
