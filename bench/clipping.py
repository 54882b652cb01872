"""Calibrated range clipping (edgekv.clipping) against plain min/max grids, on SmolLM2-135M.

For each average code width: the uniform layout and the calibrated one (`edgekv export`'s
calibration, allocation and KL selection), each with plain min/max grids (sensitivities
measured with ratio 1 only) and with the clip ratios calibration picks per side and width.
Everything runs in lockstep with the fp16 cache of the same window over the same evaluation
tokens (never the calibration text): mean KL of the next-token distributions and Δppl.
Clipping costs no bytes: the format and bits/element are unchanged. Keys round to nearest
in every row (key feedback has its own benchmark, bench/key_rounding.py).

    .venv/bin/python bench/clipping.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
"""

import time

import _layouts


def main() -> None:
    ap = _layouts.parser(__doc__, "bench/results/clipping-smollm2.json")
    ap.add_argument("--meta", default="u8", choices=["fp16", "u8"])
    args = ap.parse_args()

    from edgekv.allocation import uniform_pair
    from edgekv.calibration import calibrated_policy, measure
    from edgekv.policy import CachePolicy

    loaded, shape, ids = _layouts.load(args.max_tokens)
    model, n = loaded.model, shape.num_layers
    geometry = dict(window=1024, sinks=4, block=32, group=32, rotation="hadamard", meta=args.meta)
    base = CachePolicy.uniform(n, 3, **geometry)
    t0 = time.perf_counter()
    sens = {"min/max": measure(model, loaded.tokenizer, base, clips=(1.0,), feedback=False),
            "clipped": measure(model, loaded.tokenizer, base, feedback=False)}
    layouts = []  # (row fields, policy)
    for target in _layouts.targets(args):
        bk, bv = uniform_pair(target)
        for grid, s in sens.items():
            layouts.append(({"target": target, "layout": "uniform", "grid": grid},
                            base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n, clip=s.clip)))
            if target > min(s.widths):
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=s)
                layouts.append(({"target": target, "layout": f"calibrated ({record['selection']['chosen']})",
                                 "grid": grid}, policy))
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry,
                   clip_chosen=[list(c) for c in sens["clipped"].clip], calibration_seconds=calibration_s,
                   evaluation_seconds=evaluation_s, rows=rows)
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}; clip ratios chosen: "
          + ", ".join(f"{s}{b}:{r:g}" for s, b, r in sens["clipped"].clip))
    print()
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT, _layouts.column("grid", "grid")))


if __name__ == "__main__":
    main()
