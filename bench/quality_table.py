"""Print an `edgekv eval --json` result as the markdown rows of BENCHMARKS.md."""

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    print(f"model: {r['model'].split('/')[-1]}, {r['tokens']} tokens in {r['sequences']} sequences, "
          f"passkey lengths {r['passkey_lengths']} x depths {r['passkey_depths']}\n")
    print("| setting | ppl | Δppl vs fp16 same window | passkey | KV bytes/token | × fp16 bytes | KV MiB | eval s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in r["rows"]:
        d = "-" if row["delta_pct"] is None else f"{row['delta_pct']:+.2f} %"
        pk = "-" if row["passkey_pct"] is None else f"{row['passkey_pct']:.0f} %"
        print(f"| {row['setting']} | {row['ppl']:.3f} | {d} | {pk} | {row['kv_bytes_per_token']:.0f} "
              f"| {row['fp16_ratio']:.3f} | {row['kv_bytes'] / 2**20:.2f} | {row['seconds']:.0f} |")
    print("\npasskey trials (distance = tokens from the needle to the question):\n")
    for row in r["rows"]:
        found = ", ".join(f"{t['length']}@{t['depth']}:{'✓' if t['found'] else '✗'}({t['distance']})"
                          for t in row["passkey_trials"])
        print(f"- {row['setting']}: {found}")


if __name__ == "__main__":
    main(sys.argv[1])
