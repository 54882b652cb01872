"""A 1-bit code width for the calibrated allocation, on SmolLM2-135M.

For each average code width: the uniform layout, the calibrated layout chosen from widths
{2, 3, 4, 8} (before 1 bit existed) and the one chosen from {1, 2, 3, 4, 8} (`edgekv
export`'s default), both with the same calibration (feedback key rounding, calibrated clip
ratios; 1 bit also tries the narrow ratios of edgekv.clipping.ONE_BIT_EXTRA), allocation and
KL selection. Everything runs in lockstep with the fp16 cache of the same window over the
same evaluation tokens (never the calibration text): mean KL and Δppl. Bytes are equal
at equal average width.

    .venv/bin/python bench/one_bit.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
"""

import time

import _layouts


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/one-bit-smollm2.json")
    args = ap.parse_args()

    from edgekv.calibration import calibrated_policy, measure

    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    model = loaded.model
    t0 = time.perf_counter()
    sens = measure(model, loaded.tokenizer, base)  # every width; the rows without 1 bit drop it
    assert sens.widths[0] == 1
    without, with_one = sens.restricted((2, 3, 4, 8)), sens.restricted((1, 2, 3, 4, 8))
    layouts = []  # (row fields, policy)
    for target in _layouts.targets(args):
        layouts.append(({"target": target, "layout": "uniform"}, _layouts.uniform(base, target, sens)))
        for name, s in (("calibrated {2,3,4,8}", without), ("calibrated {1,2,3,4,8}", with_one)):
            if target > min(s.widths):
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=s)
                chosen = record["selection"]["chosen"]
                layouts.append(({"target": target, "layout": f"{name} ({chosen})"}, policy))
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry, calibration=sens.meta,
                   clip_chosen=[list(c) for c in sens.clip],
                   calibration_seconds=calibration_s, evaluation_seconds=evaluation_s, rows=rows)
    ones = ("1-bit sides", "---:", lambda r: str((r["bits_k"] + r["bits_v"]).count(1)))
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT), (ones,))


if __name__ == "__main__":
    main()
