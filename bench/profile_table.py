"""Markdown rows for BENCHMARKS.md from an `edgekv profile --json` result: every setting
at every prompt length, with decode-speed, TTFT and peak-memory ratios against each
baseline measured in the same run (kind != edgekv).

usage: .venv/bin/python bench/profile_table.py bench/results/profile-smollm2.json
"""

import sys

from edgekv.profiling.report import read_json

MiB = 2 ** 20


def main(path: str) -> None:
    doc = read_json(path)
    p = doc["params"]
    base = [s for s in doc["settings"] if s["kind"] != "edgekv"]
    rows = {(s["name"], r["prompt_len"]): r for s in doc["settings"] for r in s["rows"]}
    print(f"{doc['created']}, {doc['machine']['cpu_count']} cores, onnxruntime {doc['machine']['onnxruntime']}, "
          f"{p['gen']} new tokens after each prompt, {p['repeat']} timed run(s), threads {p['threads']}\n")
    cols = ["setting", "prompt", "TTFT s", "prefill tok/s", "decode ms p50 / p90 / p99", "decode tok/s"]
    cols += [f"tok/s × {b['name']}" for b in base] + ["peak RSS MiB"] + [f"RSS × {b['name']}" for b in base]
    cols += ["KV MiB"]
    print("| " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * (len(cols) - 1))
    for s in doc["settings"]:
        for r in s["rows"]:
            n = r["prompt_len"]
            cells = [s["name"], str(n), f"{r['ttft_ms'] / 1000:.2f}", f"{r['prefill_tok_s']:.0f}",
                     f"{r['decode_ms_p50']:.0f} / {r['decode_ms_p90']:.0f} / {r['decode_ms_p99']:.0f}",
                     f"{r['decode_tok_s']:.2f}"]
            for b in base:
                ref = rows.get((b["name"], n))
                cells.append(f"{r['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref and ref["decode_tok_s"] else "-")
            cells.append(f"{r['peak_rss_bytes'] / MiB:.0f}")
            for b in base:
                ref = rows.get((b["name"], n))
                cells.append(f"{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f}" if ref else "-")
            cells.append(f"{r['kv_bytes'] / MiB:.2f}")
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
