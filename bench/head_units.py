"""Widths per KV head in the cache format (policy.units) against one width per layer and
side, each chosen as `edgekv export` chooses it (calibration.calibrated_policy, with and
without `per_head`: the same sensitivities, and the per-head allocation one more candidate
of the selection by KL on held-out calibration tokens), scored in lockstep with the fp16
cache of the same geometry on the evaluation text. bench/head_widths.py measured the same
idea through a ring codec before the format had it.

    .venv/bin/python bench/head_units.py --bits 2,2.5,3,4 --max-tokens 6144 --sequences 2

`--text calibration` scores on held-out calibration text instead (the tokens after the ones
the sensitivities and the selection read; the same text export calibrates on, never the
evaluation text): does a difference seen on the evaluation text hold on other text?
"""

import _layouts

from edgekv.calibration import calibrated_policy, calibration_ids, coarse_group, measure
from edgekv.layout_selection import SELECTION_TOKENS
from edgekv.quality.divergence import paired_se_pct
from edgekv.reference.model import ReferenceModel


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/head-units-smollm2.json")
    _layouts.passkey_args(ap, "the per-head caches")
    ap.add_argument("--text", choices=["evaluation", "calibration"], default="evaluation",
                    help="score on the evaluation text, or on calibration text no choice read")
    ap.set_defaults(bits="2,2.5,3,4", max_tokens=6144, sequences=2)
    args = ap.parse_args()
    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    model, tok = loaded.model, loaded.tokenizer
    sens = measure(model, tok, base, coarse_group=coarse_group(base, model, True), heads=True)  # as export does
    if args.text == "calibration":
        first = sens.meta.get("tokens", 0) + SELECTION_TOKENS
        ids = calibration_ids(tok, first + args.max_tokens)[first:]
        if len(ids) < args.max_tokens:
            raise SystemExit(f"only {len(ids)} held-out calibration tokens, asked for {args.max_tokens}")
    layouts, selections = [], []
    for target in _layouts.targets(args):
        for name, per_head in (("per layer", False), ("per head", True)):
            policy, record = calibrated_policy(model, tok, base, target, sens=sens, value_groups=True,
                                               per_head=per_head)
            chosen = record["selection"]["chosen"]
            split = sum(len(policy.layer_units(i)) > 1 for i in range(policy.num_layers))
            print(f"{target:g} bits, {name}: selection chose {chosen!r}; {split} split layers, "
                  f"{policy.num_units} units", flush=True)
            layouts.append(({"target": target, "layout": name, "chosen": chosen, "split_layers": split,
                             "units": [[i, list(h)] for i, h in policy.units]}, policy))
            selections.append({"target": target, "layout": name, "selection": record["selection"]})
    rows, seconds = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.add_passkey(args, tok, rows, (ReferenceModel(model, p) if f["layout"] == "per head" else None
                                           for f, p in layouts))
    print()
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT, _layouts.column("chosen", "chosen"),
                                _layouts.column("split layers", "split_layers", "d")))
    for a, b in zip(rows[::2], rows[1::2]):  # per layer, per head of one target, scored on the same blocks
        print(f"{a['target']:g} bits: per layer minus per head Δppl {a['delta_pct'] - b['delta_pct']:+.2f} "
              f"± {paired_se_pct(a, b):.2f} points, KL {a['kl']:.5f} vs {b['kl']:.5f}")
    _layouts.write(args.json, loaded, ids, args.sequences, meta=args.meta, residual=args.residual, scored=args.text,
                   eval_seconds=seconds, rows=rows, selections=selections)


if __name__ == "__main__":
    main()
