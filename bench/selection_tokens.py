"""Does the layout selection pick better with more calibration tokens?

`calibrated_policy` chooses among a few candidate layouts (edgekv.layout_selection) by mean
KL from the fp16 cache over SELECTION_TOKENS = 1,024 held-out calibration tokens: one
sequence that barely fills the W1024 window, so nothing is evicted while it is scored. This
scores the same candidates on that selection text, on a longer one (the held-out calibration
tokens as `--long-sequences` sequences of 3,072, which evict like the evaluation does), and
on the evaluation text (the issue's 2 x 3,072 tokens), and prints which each selection
picks and what the pick costs on the evaluation text.

    .venv/bin/python bench/selection_tokens.py --bits 2,4 --meta u8s --residual u8hr
"""

import _layouts

from edgekv.calibration import calibration_ids, measure
from edgekv.layout_selection import SELECTION_TOKENS, candidates
from edgekv.quality.divergence import divergences
from edgekv.reference.model import ReferenceModel


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/selection-tokens-smollm2.json")
    ap.add_argument("--long-sequences", type=int, default=2)
    ap.set_defaults(bits="2,4", max_tokens=6144, sequences=2)
    args = ap.parse_args()
    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    tok, model = loaded.tokenizer, loaded.model
    sens = measure(model, tok, base)  # as `edgekv export` measures (all clip ratios, key feedback)
    base = base.with_(clip=sens.clip, key_feedback=sens.key_feedback)
    used = sens.meta.get("tokens", 0)
    long_n = 3072 * args.long_sequences
    texts = {"selection (1 x 1,024)": (calibration_ids(tok, used + SELECTION_TOKENS)[used:], 1),
             f"calibration ({args.long_sequences} x 3,072)": (calibration_ids(tok, used + long_n)[used:], args.long_sequences),
             f"evaluation ({args.sequences} x {len(ids) // args.sequences:,})": (ids, args.sequences)}
    fp16 = ReferenceModel(model, base.fp16_equivalent())
    results = []
    for target in _layouts.targets(args):
        cands = candidates(sens, base, target)
        kls = {}
        for name, (t, seqs) in texts.items():
            scores = divergences(fp16, [ReferenceModel(model, p) for p in cands.values()], t, sequences=seqs)
            kls[name] = {c: (s.kl, s.delta_pct) for c, s in zip(cands, scores)}
            print(f"{target:g} bits, {name}: " + ", ".join(f"{c}: KL {k:.5f} ({d:+.2f} %)"
                                                          for c, (k, d) in kls[name].items()), flush=True)
        evaluation = list(texts)[-1]
        for name in list(texts)[:-1]:
            pick = min(kls[name], key=lambda c: kls[name][c][0])
            print(f"  picked by {name}: {pick} -> evaluation KL {kls[evaluation][pick][0]:.5f}, "
                  f"Δppl {kls[evaluation][pick][1]:+.2f} %")
        results.append({"target": target, "candidates": {c: {"bits_k": list(p.bits_k), "bits_v": list(p.bits_v)}
                                                         for c, p in cands.items()},
                        "kl_delta_pct": kls})
    _layouts.write(args.json, loaded, ids, args.sequences, meta=args.meta, residual=args.residual,
                   selection_tokens=SELECTION_TOKENS, results=results)


if __name__ == "__main__":
    main()
