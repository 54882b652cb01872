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

import time

import _layouts


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/key-rounding-smollm2.json")
    ap.add_argument("--layouts", default="uniform,calibrated")
    ap.add_argument("--kv-split", type=int, default=0,
                    help="also K{b}/V16 and K16/V{b} at this width with feedback: which side loses what")
    args = ap.parse_args()

    from edgekv.calibration import calibrated_policy, measure

    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    model, n = loaded.model, shape.num_layers
    t0 = time.perf_counter()
    sens = {"nearest": measure(model, loaded.tokenizer, base, feedback=False),
            "feedback": measure(model, loaded.tokenizer, base)}
    layouts = []  # (row fields, policy)
    kinds = args.layouts.split(",")
    for target in _layouts.targets(args):
        for rounding, s in sens.items():
            row = {"target": target, "rounding": rounding}
            if "uniform" in kinds:
                layouts.append(({**row, "layout": "uniform"}, _layouts.uniform(base, target, s)))
            if "calibrated" in kinds and target > min(s.widths):
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=s)
                layouts.append(({**row, "layout": f"calibrated ({record['selection']['chosen']})"}, policy))
    if args.kv_split:
        s, b = sens["feedback"], args.kv_split
        for bk, bv in ((b, 16), (16, b)):
            layouts.append(({"target": (bk + bv) / 2, "rounding": "feedback", "layout": f"K{bk}/V{bv}"},
                            base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n, clip=s.clip, key_feedback=s.key_feedback)))
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry,
                   calibration={k: s.meta for k, s in sens.items()},
                   clip_chosen={k: [list(c) for c in s.clip] for k, s in sens.items()},
                   calibration_seconds=calibration_s, evaluation_seconds=evaluation_s, rows=rows)
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}; measure() took "
          + ", ".join(f"{k} {s.meta['seconds']:.1f} s" for k, s in sens.items()))
    print()
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT, _layouts.column("key rounding", "rounding")))


if __name__ == "__main__":
    main()
