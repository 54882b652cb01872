"""Five- and six-bit code widths for the calibrated allocation, on SmolLM2-135M.

For each average code width, from one calibration (feedback key rounding, calibrated clip
ratios): the uniform layout, the layout `edgekv export` chose before 5 and 6 existed
(widths {1, 2, 3, 4, 8}), and every candidate of the KL selection (edgekv.layout_selection)
it chooses from now: the allocation from {1, 2, 3, 4, 5, 6, 8}, a shrunk one, the one from
the coarse widths {1, 2, 3, 4, 8}, uniform, the chosen one marked, so a choice the
evaluation text disagrees with shows. A layout that arises several ways is one row.
Everything runs in lockstep with the fp16 cache of the same window over the same
evaluation tokens (never the calibration text): mean KL and Δppl. Bytes are equal at equal
average width.

    .venv/bin/python bench/code_widths.py [--bits 2,2.5,3,3.5,4] [--max-tokens 4096] [--sequences 4]
"""

import time

import _layouts

BEFORE, NOW = (1, 2, 3, 4, 8), (1, 2, 3, 4, 5, 6, 8)


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/code-widths-smollm2.json")
    args = ap.parse_args()

    from edgekv.allocation import uniform_pair
    from edgekv.calibration import calibrated_policy, measure

    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    model, n = loaded.model, shape.num_layers
    t0 = time.perf_counter()
    sens = measure(model, loaded.tokenizer, base)
    assert set(NOW) <= set(sens.widths), sens.widths
    base = base.with_(clip=sens.clip, key_feedback=sens.key_feedback)
    layouts = []  # (row fields, policy); a layout that arises several ways is one row
    for target in _layouts.targets(args):
        named: dict[tuple, list] = {}

        def add(name, policy):
            key = (policy.bits_k, policy.bits_v)
            named[key] = [named[key][0] + " = " + name, policy] if key in named else [name, policy]

        bk, bv = uniform_pair(target)
        add("uniform", base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n))
        before, _ = calibrated_policy(model, loaded.tokenizer, base, target, sens=sens.restricted(BEFORE))
        add("export before", before)
        _, record = calibrated_policy(model, loaded.tokenizer, base, target, sens=sens.restricted(NOW))
        chosen = record["selection"]["chosen"]
        for c in record["selection"]["candidates"]:
            add(f"now: {c['name']}" + (" (chosen)" if c["name"] == chosen else ""),
                base.with_(bits_k=tuple(c["bits_k"]), bits_v=tuple(c["bits_v"])))
        layouts += [({"target": target, "layout": name}, policy) for name, policy in named.values()]
    calibration_s = time.perf_counter() - t0
    rows, evaluation_s = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.write(args.json, loaded, ids, args.sequences, geometry=geometry, calibration=sens.meta,
                   clip_chosen=[list(c) for c in sens.clip],
                   calibration_seconds=calibration_s, evaluation_seconds=evaluation_s, rows=rows)
    wide = ("5/6-bit sides", "---:", lambda r: str(sum(b in (5, 6) for b in r["bits_k"] + r["bits_v"])))
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT), (wide,))


if __name__ == "__main__":
    main()
