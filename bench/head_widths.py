"""Would a code width per KV head beat one per layer? (the session-23 experiment, before
the bundle format had widths per head; bench/head_units.py measures the format itself)

The shipped calibration measures each (layer, side)'s loss at every width; a KV head's
error reaches only its own query heads' output channels, so the same measurement splits
exactly into one loss per KV head (edgekv.calibration.measure(heads=True)). The
same knapsack (edgekv.allocation) then allocates 3x as many items, value groups included,
at the same average. Both allocations are scored on the evaluation text through a ring
codec that quantizes each KV head at its own width with the shipped formats (clip ratios,
key feedback, 8-bit metadata per block; "u8s" shares a block's metadata across the heads
of one width call, here one head), so "per layer" and "per head" differ only in the
widths. The shipped cache runs beside them as the check that the codec matches it.

    .venv/bin/python bench/head_widths.py --bits 2
"""

import torch

import _layouts

from edgekv.allocation import allocate
from edgekv.calibration import calibrated_policy, coarse_group, measure
from edgekv.methods.base import RingCodec
from edgekv.methods.codec_cache import method_model
from edgekv.reference import quant_torch as qt
from edgekv.reference.model import ReferenceModel


class HeadWidths(RingCodec):
    """Each KV head of a ring block quantized at its own width (and value group) with the
    shipped formats; `bits_k[layer][head]`."""

    name = "head-widths"

    def __init__(self, policy, bits_k, bits_v, groups_v) -> None:
        self.policy, self.bits_k, self.bits_v, self.groups_v = policy, bits_k, bits_v, groups_v
        fb = policy.key_feedback
        self.fb = None if fb is None else torch.from_numpy(fb.matrices.copy())

    def keys(self, layer, x, bits):
        out = x.clone()
        for h, w in enumerate(self.bits_k[layer]):
            fb = None if self.fb is None else self.fb[layer][h:h + 1]
            out[:, h:h + 1] = qt.fake_quantize_keys(x[:, h:h + 1], w, self.policy.meta, self.policy.clip_ratio("k", w), fb)
        return out

    def values(self, layer, x, bits, group):
        out = x.clone()
        for h, (w, g) in enumerate(zip(self.bits_v[layer], self.groups_v[layer])):
            out[:, h:h + 1] = qt.fake_quantize_values(x[:, h:h + 1], w, g, self.policy.meta, x.shape[-2],
                                                      self.policy.clip_ratio("v", w))
        return out


def per_head(flat: tuple, heads: int) -> list[tuple]:
    return [tuple(flat[i:i + heads]) for i in range(0, len(flat), heads)]


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/head-widths-smollm2.json")
    _layouts.passkey_args(ap, "the per-head caches")
    ap.set_defaults(bits="2", max_tokens=6144, sequences=2)
    args = ap.parse_args()
    loaded, shape, ids, geometry, base = _layouts.shipped(args)
    tok, model = loaded.tokenizer, loaded.model
    hkv = shape.num_kv_heads
    # as export measures, with the per-(layer, head) rows of the same computation
    sens = measure(model, tok, base, coarse_group=coarse_group(base, model, True), heads=True)
    heads = sens.per_head()
    base = base.with_(clip=sens.clip, key_feedback=sens.key_feedback)
    fine_cost = base.scale_zero_bits(base.group) - base.scale_zero_bits(sens.coarse_group)
    layouts, results = [], []
    for target in _layouts.targets(args):
        shipped, record = calibrated_policy(model, tok, base, target, sens=sens, value_groups=True)
        shipped = shipped.with_(clip=sens.clip)
        plain = allocate(sens, target, base.group, fine_cost)  # the selection's "shrink 1" candidate
        fine = allocate(heads, target, base.group, fine_cost)
        split = heads.predicted_loss((w for w in plain.bits_k for _ in range(hkv)),
                                     (w for w in plain.bits_v for _ in range(hkv)),
                                     [g for g in plain.groups_v for _ in range(hkv)])
        pred = {"per layer (measured per layer)": plain.predicted_loss, "per layer (sum of its heads)": split,
                "per head": fine.predicted_loss}
        print(f"{target:g} bits: predicted loss " + ", ".join(f"{k} {v:.5f}" for k, v in pred.items())
              + f"; shipped layout chosen by selection: {record['selection']['chosen']}", flush=True)
        rep = lambda t: [tuple([w] * hkv) for w in t]  # noqa: E731
        as_codec = {"per layer (allocation)": HeadWidths(base, rep(plain.bits_k), rep(plain.bits_v), rep(plain.groups_v)),
                    "per head (allocation)": HeadWidths(base, per_head(fine.bits_k, hkv), per_head(fine.bits_v, hkv),
                                                        per_head(fine.groups_v, hkv))}
        layouts.append(({"target": target, "layout": "shipped (bundle format)"}, ReferenceModel(model, shipped)))
        layouts += [({"target": target, "layout": name}, method_model(model, shipped, c)) for name, c in as_codec.items()]
        results.append({"target": target, "predicted_loss": pred, "selection": record["selection"]["chosen"],
                        "per_head": {"bits_k": per_head(fine.bits_k, hkv), "bits_v": per_head(fine.bits_v, hkv),
                                     "groups_v": per_head(fine.groups_v, hkv)},
                        "per_layer": {"bits_k": plain.bits_k, "bits_v": plain.bits_v, "groups_v": plain.groups_v}})
    from edgekv.quality.divergence import divergences

    fp16 = ReferenceModel(model, base.fp16_equivalent())
    scores = divergences(fp16, [m for _, m in layouts], ids, sequences=args.sequences)
    rows = [{**fields, "kl": s.kl, "delta_pct": s.delta_pct} for (fields, _), s in zip(layouts, scores)]
    _layouts.add_passkey(args, tok, rows, (m if f["layout"].startswith("per head") else None for f, m in layouts))
    print("\n| average code bits | layout | KL vs fp16 | Δppl |\n|---:|---|---:|---:|")
    for r in rows:
        passkey = f", passkey {r['passkey_pct']:.0f} % of {r['passkey_trials']}" if "passkey_pct" in r else ""
        print(f"| {r['target']:g} | {r['layout']} | {r['kl']:.5f} | {r['delta_pct']:+.2f} %{passkey} |")
    _layouts.write(args.json, loaded, ids, args.sequences, meta=args.meta, residual=args.residual,
                   results=results, rows=rows)


if __name__ == "__main__":
    main()
