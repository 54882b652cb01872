"""Does measured KL find a better layout than the proxy's knapsack?

`edgekv export` allocates widths by a diagonal-Fisher proxy that adds up per-side losses
(edgekv.allocation), then picks among a few such candidates by measured KL
(edgekv.layout_selection). The proxy under-predicts the 2-bit cache's Δppl about 2x, so
interactions between sides matter there. This starts from the shipped layout and takes
greedy byte-neutral steps (one side one width up, another one width down), proposed in the
order the proxy says they cost least and kept only when the KL over the selection's held-out
calibration tokens falls. The start and the refined layout are then scored on the
evaluation text (the issue's 2 x 3,072 tokens), in lockstep with the fp16 cache.

    .venv/bin/python bench/layout_refinement.py --bits 2 --rounds 4 --proposals 8
"""

import time

import _layouts

from edgekv.calibration import calibrated_policy, calibration_ids, coarse_group, measure
from edgekv.layout_selection import SELECTION_TOKENS
from edgekv.quality.divergence import divergences
from edgekv.reference.model import ReferenceModel


def byte_neutral_moves(sens, policy):
    """(predicted loss change, policy, description) of every move that raises one side by one
    width step and lowers another by a step of the same bits, least predicted damage first."""
    widths, n = sens.widths, policy.num_layers
    cur = {("k", i): policy.bits_k[i] for i in range(n)} | {("v", i): policy.bits_v[i] for i in range(n)}

    def step(w, d):
        j = widths.index(w) + d
        return widths[j] if 0 <= j < len(widths) else None

    def with_bits(bits):
        return policy.with_(bits_k=tuple(bits[("k", i)] for i in range(n)),
                            bits_v=tuple(bits[("v", i)] for i in range(n)))

    def loss(p):
        return sens.predicted_loss(p.bits_k, p.bits_v, p.groups_v)

    start = loss(policy)
    out = []
    for up_side, w in cur.items():
        up = step(w, +1)
        for down_side, v in cur.items():
            down = step(v, -1)
            if up is None or down is None or down_side == up_side or up - w != v - down:
                continue
            p = with_bits({**cur, up_side: up, down_side: down})
            out.append((loss(p) - start, p, f"{up_side[0]}{up_side[1]} {w}->{up}, {down_side[0]}{down_side[1]} {v}->{down}"))
    return sorted(out, key=lambda m: m[0])


def refine(model, ids, sens, policy, rounds: int, proposals: int, log: list):
    fp16 = ReferenceModel(model, policy.fp16_equivalent())
    for r in range(rounds):
        moves = byte_neutral_moves(sens, policy)[:proposals]
        t0 = time.perf_counter()
        scores = divergences(fp16, [ReferenceModel(model, p) for p in [policy] + [m[1] for m in moves]], ids)
        current, kls = scores[0].kl, [s.kl for s in scores[1:]]
        best = min(range(len(moves)), key=kls.__getitem__)
        entry = {"round": r, "current_kl": current, "seconds": round(time.perf_counter() - t0, 1),
                 "moves": [{"move": m[2], "predicted": m[0], "kl": k} for m, k in zip(moves, kls)]}
        log.append(entry)
        print(f"round {r}: current KL {current:.5f}; " + "; ".join(f"{m[2]}: {k:.5f}" for m, k in zip(moves, kls)),
              flush=True)
        if kls[best] >= current:
            print("  no move lowers the KL: stop", flush=True)
            break
        policy = moves[best][1]
        entry["accepted"] = moves[best][2]
        print(f"  accepted {moves[best][2]} ({kls[best]:.5f})", flush=True)
    return policy


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/layout-refinement-smollm2.json")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--proposals", type=int, default=8)
    ap.set_defaults(bits="2", max_tokens=6144, sequences=2)
    args = ap.parse_args()
    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    tok, model = loaded.tokenizer, loaded.model
    sens = measure(model, tok, base, coarse_group=coarse_group(base, model, True))  # as export measures
    used = sens.meta.get("tokens", 0)
    held_out = calibration_ids(tok, used + SELECTION_TOKENS)[used:]  # the selection's tokens
    results = []
    for target in _layouts.targets(args):
        start, _ = calibrated_policy(model, tok, base, target, sens=sens, value_groups=True)
        start = start.with_(clip=sens.clip)  # ratios for every width a move may reach
        log: list = []
        refined = refine(model, held_out, sens, start, args.rounds, args.proposals, log)
        rows, seconds = _layouts.score(loaded, shape, geometry, [({"target": target, "layout": "shipped"}, start),
                                                                 ({"target": target, "layout": "refined"}, refined)],
                                       ids, args.sequences)
        _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT))
        results.append({"target": target, "rows": rows, "search": log, "evaluation_seconds": round(seconds, 1)})
    _layouts.write(args.json, loaded, ids, args.sequences, meta=args.meta, residual=args.residual,
                   selection_tokens=SELECTION_TOKENS, results=results)


if __name__ == "__main__":
    main()
