"""What each accuracy method buys inside the shipped cache: leave one out at a time.

For each average code width, the shipped default (`edgekv export --bits B`: Hadamard
rotation, calibrated range clipping, query-aware key rounding, a calibrated per-layer
layout chosen by KL, 8-bit scale/zero, 8-bit sinks and residual) against the same cache
with one method removed -- each variant calibrated and laid out exactly as an export of it
would be (calibration.calibrated_policy on its own measurement) -- and against the
straightforward cache (uniform widths, no rotation, min/max ranges, nearest rounding,
fp16 scale/zero, fp16 sinks and residual). All rows run in lockstep with one fp16 cache of
the same window over the same evaluation tokens (never the calibration text): mean KL,
Δppl, bits per element with metadata and the whole cache's ratio to fp16 bytes.

    .venv/bin/python bench/leave_one_out.py [--bits 2,3,4] [--max-tokens 4096] [--sequences 4]
"""

import time

import _layouts

# (row name, changes to the shipped geometry, measure() options): one method left out each.
VARIANTS = (
    ("shipped", {}, {}),
    ("- rotation", {"rotation": "none"}, {}),
    ("- range clipping", {}, {"clips": (1.0,)}),
    ("- key feedback", {}, {"feedback": False}),
    ("- 8-bit scale/zero (fp16)", {"meta": "fp16"}, {}),
    ("- 8-bit sinks/residual (fp16)", {"residual": "fp16"}, {}),
)
STRAIGHTFORWARD = {"rotation": "none", "meta": "fp16", "residual": "fp16"}


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/leave-one-out-smollm2.json")
    ap.set_defaults(bits="2,3,4")
    args = ap.parse_args()

    from edgekv.calibration import calibrated_policy, measure

    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    model, tok = loaded.model, loaded.tokenizer
    t0 = time.perf_counter()
    layouts, shipped_sens = [], None
    for name, change, options in VARIANTS:
        variant = base.with_(**change)
        sens = measure(model, tok, variant, **options)
        shipped_sens = shipped_sens or sens
        for target in _layouts.targets(args):
            policy, record = calibrated_policy(model, tok, variant, target, sens=sens)
            chosen = record["selection"]["chosen"] if record["selection"] else "allocation"
            layouts.append(({"target": target, "layout": f"{name} ({chosen})"}, policy))
    for target in _layouts.targets(args):
        # the shipped cache with a uniform layout (its clip ratios and key rounding stay), and
        # the straightforward one at the same widths
        same = _layouts.uniform(base, target, shipped_sens)
        layouts.append(({"target": target, "layout": "- calibrated layout (uniform)"}, same))
        layouts.append(({"target": target, "layout": "straightforward (uniform, nothing else)"},
                        same.with_(clip=(), key_feedback=None, **STRAIGHTFORWARD)))
    layouts.sort(key=lambda lp: lp[0]["target"])
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry,
                   calibration_seconds=calibration_s, evaluation_seconds=evaluation_s, rows=rows)
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT))


if __name__ == "__main__":
    main()
