"""How much of a Δppl is the luck of the text: Δppl ± standard error for every quantized row
of one or more `edgekv eval --json` results, per sequence subset, and the paired difference
between two results' rows in order, the i-th quantized row of each (scored on the same
blocks against the same fp16 cache, so the text's shared luck cancels).

    python bench/delta_error.py A.json [B.json] [--first-sequences N]

`--first-sequences N` keeps the blocks of the first N sequences only: eval splits its tokens
into equal consecutive sequences, so the first 2 of 6 x 3,072 are the issue's 2 x 3,072.
"""

from __future__ import annotations

import argparse
import json
import math

from edgekv.quality.divergence import delta_pct_se, paired_se_pct


def _rows(path: str, first: int | None) -> tuple[dict, dict]:
    r = json.load(open(path))
    s = r["sequences"]
    out = {}
    for row in r["rows"]:
        if not row.get("block_tokens"):
            continue  # the fp16 row, or a result written before blocks were kept
        keep = [i for i in range(len(row["block_tokens"])) if first is None or i % s < first]
        d = [row["block_delta_nll"][i] for i in keep]
        n = [row["block_tokens"][i] for i in keep]
        out[row["average_bits"]] = {"setting": row["setting"], "block_delta_nll": d, "block_tokens": n,
                                    "delta_pct": 100 * math.expm1(sum(d) / sum(n)),
                                    "se": delta_pct_se(d, n), "kl": row.get("kl")}
    return r, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--first-sequences", type=int, default=None)
    a = ap.parse_args()
    loaded = [_rows(p, a.first_sequences) for p in a.results]
    for path, (r, rows) in zip(a.results, loaded):
        seqs = r["sequences"] if a.first_sequences is None else min(a.first_sequences, r["sequences"])
        print(f"{path}: {seqs} x {r['tokens'] // r['sequences']} tokens")
        for bits, row in sorted(rows.items()):
            print(f"  {row['setting']}: Δppl {row['delta_pct']:+.2f} % ± {row['se']:.2f} (KL of all sequences "
                  f"{row['kl']:.4f})")
    if len(loaded) == 2:
        (_, a_rows), (_, b_rows) = loaded
        print("paired: first minus second (the i-th quantized row of each, in order)")
        # Rows pair by order, not by average_bits: layouts of one nominal width store
        # slightly different averages (value groups, per-head widths).
        for x, y in zip((a_rows[b] for b in sorted(a_rows)), (b_rows[b] for b in sorted(b_rows))):
            print(f"  {x['setting']} minus {y['setting']}: {x['delta_pct'] - y['delta_pct']:+.2f} "
                  f"± {paired_se_pct(x, y):.2f} points (KL {x['kl']:.4f} vs {y['kl']:.4f})")


if __name__ == "__main__":
    main()
