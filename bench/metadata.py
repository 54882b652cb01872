"""8-bit against fp16 scale/zero (policy.meta), per byte, on SmolLM2-135M.

For each average code width, the calibrated layout `edgekv export` would ship (same
calibration and KL selection) and the uniform one, with fp16 metadata and with 8-bit
metadata, all run in lockstep with the fp16 cache of the same window over the same
evaluation tokens: mean KL of the next-token distributions and Δppl, beside the bits each
element really costs and the whole cache's ratio to fp16 bytes. Widths 3.5 with u8 and
3 with fp16 cost the same bytes (4.02 vs 4.00 bits per element), as do 2.5 u8 and 2 fp16.

    .venv/bin/python bench/metadata.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
"""

import time

import _layouts


def main() -> None:
    ap = _layouts.parser(__doc__, "bench/results/metadata-smollm2.json")
    ap.add_argument("--rotation", default="hadamard", choices=["none", "hadamard"])
    args = ap.parse_args()

    from edgekv.allocation import uniform_pair
    from edgekv.calibration import calibrated_policy, measure
    from edgekv.policy import CachePolicy

    loaded, shape, ids = _layouts.load(args.max_tokens)
    model, n = loaded.model, shape.num_layers
    geometry = dict(window=1024, sinks=4, block=32, group=32, rotation=args.rotation)
    layouts = []  # (row fields, policy)
    t0 = time.perf_counter()
    for meta in ("fp16", "u8"):
        base = CachePolicy.uniform(n, 3, meta=meta, **geometry)
        sens = measure(model, loaded.tokenizer, base)
        for target in _layouts.targets(args):
            bk, bv = uniform_pair(target)
            row = {"meta": meta, "target": target}
            layouts.append(({**row, "layout": "uniform"}, base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n)))
            if target > min(sens.widths):  # at the lowest width every layout is uniform
                policy, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=sens)
                layouts.append(({**row, "layout": f"calibrated ({record['selection']['chosen']})"}, policy))
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry, calibration_seconds=calibration_s,
                   evaluation_seconds=evaluation_s, rows=rows)
    print(f"\nfp16 cache, same window: ppl {rows[0]['reference_ppl']:.3f}\n")
    _layouts.print_table(sorted(rows, key=lambda r: (r["bits_per_element"], r["meta"], r["layout"])),
                         (_layouts.column("metadata", "meta"), _layouts.TARGET, _layouts.LAYOUT))


if __name__ == "__main__":
    main()
