"""What the layout benchmarks (clipping.py, metadata.py, key_rounding.py) share: their
common arguments, SmolLM2 with the evaluation tokens, and scoring a list of cache policies
in lockstep with the fp16 cache of the same geometry (KL and Δppl), written as JSON."""

import argparse
import json
import time
from pathlib import Path


def parser(doc: str, json_default: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--bits", default="2,2.5,3,3.5,4", help="average code widths")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--json", default=json_default)
    return ap


def targets(args) -> list[float]:
    return [float(b) for b in args.bits.split(",")]


def load(max_tokens: int):
    """(loaded model, KVShape, evaluation token ids): never the calibration text."""
    from edgekv.export.model_loading import load_model
    from edgekv.quality.text import evaluation_text
    from edgekv.reference.model import kv_shape

    loaded = load_model("default")
    ids = loaded.tokenizer(evaluation_text()).input_ids[:max_tokens]
    return loaded, kv_shape(loaded.model.config), ids


def shipped_parser(doc: str, json_default: str) -> argparse.ArgumentParser:
    """parser() plus the window, value group, scale/zero and sink/residual storage of the
    shipped geometry (`shipped`; results before 2026-12-04's session 14 used an fp16
    residual: pass --residual fp16 to reproduce them)."""
    from edgekv.policy import DEFAULT_META, DEFAULT_RESIDUAL, METAS, RESIDUALS

    ap = parser(doc, json_default)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--meta", default=DEFAULT_META, choices=METAS)
    ap.add_argument("--residual", default=DEFAULT_RESIDUAL, choices=RESIDUALS)
    return ap


def shipped(args):
    """load() plus the shipped cache geometry (Hadamard rotation; the value group, scale/zero
    and sink/residual storage of args) at args.window and a uniform 3-bit base policy
    of it: (loaded, KVShape, ids, geometry, base)."""
    from edgekv.policy import CachePolicy

    loaded, shape, ids = load(args.max_tokens)
    geometry = dict(window=args.window, sinks=4, block=32, group=args.group, rotation="hadamard", meta=args.meta,
                    residual=args.residual)
    return loaded, shape, ids, geometry, CachePolicy.uniform(shape.num_layers, 3, **geometry)


def passkey_args(ap: argparse.ArgumentParser, what: str) -> None:
    """--passkey-lengths / --passkey-depths for the caches `add_passkey` tests."""
    ap.add_argument("--passkey-lengths", default="", help=f"also passkey for {what}, e.g. 768,1024")
    ap.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")


def add_passkey(args, tokenizer, rows: list[dict], models) -> None:
    """With args.passkey_lengths, each row whose model (an iterable beside `rows`, consumed
    only then) is not None gains passkey_pct and passkey_trials."""
    if not args.passkey_lengths:
        return
    from edgekv.quality.passkey import passkey

    lengths = [int(x) for x in args.passkey_lengths.split(",")]
    depths = [float(x) for x in args.passkey_depths.split(",")]
    for row, model in zip(rows, models):
        if model is not None:
            trials = passkey(model, tokenizer, lengths, depths)
            row["passkey_pct"] = 100.0 * sum(t.found for t in trials) / len(trials)
            row["passkey_trials"] = len(trials)


def uniform(base, target: float, sens):
    """`base` at the uniform widths of `target` (K3/V2 for 2.5), quantizing as `sens` was
    measured (its clip ratios and key rounding): the uniform row beside a calibrated one."""
    from edgekv.allocation import uniform_pair

    bk, bv = uniform_pair(target)
    n = base.num_layers
    return base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n, clip=sens.clip, key_feedback=sens.key_feedback)


def score(loaded, shape, geometry: dict, layouts: list[tuple[dict, object]], ids: list[int],
          sequences: int) -> tuple[list[dict], float]:
    """layouts: (row fields, CachePolicy). Rows gain KL, ppl, Δppl, bits/element, bytes
    ratio and widths; also returns the evaluation seconds."""
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.reference.model import ReferenceModel

    fp16 = ReferenceModel(loaded.model, CachePolicy.uniform(shape.num_layers, 16, **geometry).fp16_equivalent())
    t0 = time.perf_counter()
    scores = divergences(fp16, [ReferenceModel(loaded.model, p) for _, p in layouts], ids, sequences=sequences)
    rows = [{**fields, "kl": d.kl, "ppl": d.ppl_test, "reference_ppl": d.ppl_reference, "delta_pct": d.delta_pct,
             "delta_pct_se": d.delta_pct_se, "block_delta_nll": d.block_delta_nll, "block_tokens": d.block_tokens,
             "bits_per_element": p.bits_per_element(shape), "fp16_ratio": p.fp16_ratio(shape),
             "bits_k": list(p.bits_k), "bits_v": list(p.bits_v), "clip": [list(c) for c in p.clip]}
            for (fields, p), d in zip(layouts, scores)]
    return rows, time.perf_counter() - t0


def write(path: str, loaded, ids: list[int], sequences: int, **fields) -> None:
    from edgekv.quality.text import DEFAULT_TEXT_SOURCE

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"model": loaded.source, "text": DEFAULT_TEXT_SOURCE, "tokens": len(ids),
                                      "sequences": sequences, **fields}, indent=2))


def column(header: str, key: str, fmt: str = "") -> tuple[str, str, object]:
    """A table column of row[key]: right-aligned when `fmt` formats a number."""
    return header, "---:" if fmt else "---", lambda r: format(r[key], fmt)


TARGET, LAYOUT = column("average code bits", "target", "g"), column("layout", "layout")
# The columns every layout table has after its own: bits/element, × fp16, KL, Δppl.
SCORES = (column("bits/element", "bits_per_element", ".2f"), column("× fp16 bytes", "fp16_ratio", ".3f"),
          column("KL vs fp16", "kl", ".5f"), ("Δppl", "---:", lambda r: f"{r['delta_pct']:+.2f} %"))


def print_table(rows: list[dict], lead, tail=()) -> None:
    """A markdown table: the `lead` columns (header, alignment, cell of a row), SCORES, `tail`."""
    cols = [*lead, *SCORES, *tail]
    print("| " + " | ".join(h for h, _, _ in cols) + " |")
    print("|" + "|".join(a for _, a, _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(cell(r) for _, _, cell in cols) + " |")


def score_modes(args, variant) -> None:
    """The reading-side simulations (residual_precision.py, key_axis.py): for each target
    width, the shipped calibrated layout and `variant(model, policy, mode)` for each of
    args.modes, scored in lockstep with the fp16 cache, printed and written to args.json."""
    from edgekv.calibration import calibrated_policy, measure
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.reference.model import ReferenceModel

    loaded, shape, ids, geometry, base = shipped(args)
    model, tok = loaded.model, loaded.tokenizer
    sens = measure(model, tok, base)
    tests, names = [], []
    for target in targets(args):
        policy, _ = calibrated_policy(model, tok, base, target, sens=sens)
        tests.append(ReferenceModel(model, policy))
        names.append((target, "shipped", policy))
        for mode in args.modes.split(","):
            tests.append(variant(model, policy, mode))
            names.append((target, mode, policy))
    fp16 = ReferenceModel(model, CachePolicy.uniform(shape.num_layers, 16, **geometry).fp16_equivalent())
    t0 = time.perf_counter()
    scores = divergences(fp16, tests, ids, sequences=args.sequences)
    rows = [dict(target=t, mode=m, kl=d.kl, delta_pct=d.delta_pct, fp16_ratio=p.fp16_ratio(shape))
            for (t, m, p), d in zip(names, scores)]
    for r in rows:
        print(f"{r['target']:4} {r['mode']:10} KL {r['kl']:.5f}  Δppl {r['delta_pct']:+.2f} %")
    write(args.json, loaded, ids, args.sequences, geometry=geometry,
          evaluation_seconds=time.perf_counter() - t0, rows=rows)
    print(json.dumps({"wrote": args.json}))
