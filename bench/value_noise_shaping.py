"""Noise shaping for values along tokens (negative result, BENCHMARKS.md "Noise shaping
for values along tokens"): a zero-byte encoder change that carries each token's rounding error,
times c, into the next token of the block before it is rounded, so that the errors of
neighbouring tokens cancel in attention's weighted sum where the weights are smooth.

The reference backend with ring codecs (edgekv.methods): keys rounded with the shipped key
feedback (matrices from the calibration text), values per token in groups of 32 with each
token's own fp16 min/max scale and zero (the carried error is clamped by the range); c = 0
is nearest rounding. Uniform widths, rotation on; KL and Δppl against the fp16 cache with
the same window, in lockstep.

    .venv/bin/python bench/value_noise_shaping.py [--bits 2] [--carry 0,0.5,1] [--max-tokens 4096] [--sequences 4]
"""

import argparse

import _feedback_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2")
    ap.add_argument("--carry", default="0,0.5,1")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--json", default="bench/results/value-noise-shaping-smollm2.json")
    args = ap.parse_args()
    import torch

    from edgekv.reference import quant_torch as qt

    loaded, shape, _, keys = _feedback_codec.load()

    class Codec(_feedback_codec.feedback_keys_codec(keys)):
        def __init__(self, carry: float) -> None:
            self.carry = carry

        def values(self, layer, x, bits, group):
            if self.carry == 0:
                return qt.fake_quantize_values(x, bits, group)
            g = x.float().reshape(*x.shape[:-1], -1, group)  # [..., B, D/G, G]
            s, z = qt._scale_zero(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), bits)
            out, err = torch.empty_like(g), torch.zeros_like(g[..., 0, :, :])
            for t in range(g.shape[-3]):  # token by token: round the token plus the carried error
                u = g[..., t, :, :] + self.carry * err
                st, zt = s[..., t, :, :], z[..., t, :, :]
                out[..., t, :, :] = qt._codes(u, st, zt, bits).float() * st.float() + zt.float()
                err = u - out[..., t, :, :]
            return out.reshape(x.shape)

    codecs = {float(c): Codec(float(c)) for c in args.carry.split(",")}
    rows, tokens = _feedback_codec.score(loaded, shape, codecs, [int(x) for x in args.bits.split(",")],
                                         args.max_tokens, args.sequences, "carry")
    _feedback_codec.write(args.json, rows, tokens, args.sequences)
    print("\n| bits | carried error | KL vs fp16 | Δppl |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['bits']} | {r['carry']:g} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
