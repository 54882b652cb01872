"""Does the shipped calibration get better layouts from more calibration text?

`edgekv export` measures sensitivities (sampled Fisher, calibrated clip ratios, key
feedback, value groups) on 512 calibration tokens with 128 queries, then selects among
candidate layouts on the next 1,024 tokens. This runs that whole pipeline at several sizes
(`--sizes tokens:queries,...`) and scores every resulting layout on the evaluation text
(the issue's 2 x 3,072 tokens) in lockstep with the fp16 cache of the same window. The
2026-12-02 version of this question (bench/calibration_size.py) predates the sampled
Fisher, the selection and key feedback, and ranked by Δppl on 2 x 1,024 tokens.

    .venv/bin/python bench/calibration_tokens.py --bits 2 --sizes 512:128,2048:512
"""

import time

import _layouts

from edgekv.calibration import calibrated_policy, coarse_group, measure


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/calibration-tokens-smollm2.json")
    ap.add_argument("--sizes", default="512:128,2048:512", help="calibration tokens:queries, comma-separated")
    ap.set_defaults(bits="2", max_tokens=6144, sequences=2)
    args = ap.parse_args()
    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    tok, model = loaded.tokenizer, loaded.model
    layouts, calibrations = [], []
    for size in args.sizes.split(","):
        tokens, queries = map(int, size.split(":"))
        t0 = time.perf_counter()
        sens = measure(model, tok, base, tokens=tokens, queries=queries, coarse_group=coarse_group(base, model, True))
        measured = time.perf_counter() - t0
        for target in _layouts.targets(args):
            policy, record = calibrated_policy(model, tok, base, target, sens=sens, value_groups=True)
            layouts.append(({"target": target, "layout": f"calibrated on {tokens} tokens, {queries} queries",
                             "chosen": record["selection"]["chosen"], "groups_v": list(policy.groups_v)}, policy))
        calibrations.append({"tokens": tokens, "queries": queries, "measure_seconds": round(measured, 1),
                             "clip": [list(c) for c in sens.clip]})
        print(f"{tokens} tokens / {queries} queries: measured in {measured:.0f} s", flush=True)
    for target in _layouts.targets(args):
        layouts.append(({"target": target, "layout": "uniform", "chosen": "-", "groups_v": []},
                        _layouts.uniform(base, target, sens)))
    rows, seconds = _layouts.score(loaded, shape, geometry, layouts, ids, args.sequences)
    _layouts.print_table(rows, (_layouts.TARGET, _layouts.LAYOUT), (_layouts.column("chosen", "chosen"),))
    _layouts.write(args.json, loaded, ids, args.sequences, meta=args.meta, residual=args.residual,
                   calibrations=calibrations, rows=rows, evaluation_seconds=round(seconds, 1))


if __name__ == "__main__":
    main()
