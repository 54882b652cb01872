"""Error feedback for values too? (negative result, BENCHMARKS.md "Query-aware key rounding").

The reference backend with ring codecs (edgekv.methods): keys always rounded with the
shipped key feedback (edgekv.key_feedback, matrices from the calibration queries); values
rounded to nearest, or with the same update across each token's channels under one of
three weights M_v fitted on the calibration text (never the evaluation text):
  gradient  E_s[w_s w_s^T], w_s = sum_t a_ts g_t: the attention-aggregated output gradient
  fisher    the rotated diagonal of the sampled Fisher of the attention output
  o_proj    W_o^T W_o of the KV head's query heads (no data)
Uniform widths, fp16 scale/zero, no clipping, rotation on; KL and Δppl against the fp16
cache with the same window, all in lockstep.

    .venv/bin/python bench/value_feedback.py [--bits 2,3] [--max-tokens 4096] [--sequences 4]
"""

import argparse

import _feedback_codec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", default="2,3")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--json", default="bench/results/value-feedback-smollm2.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from edgekv.calibration import calibration_ids, capture
    from edgekv.key_feedback import round_with_feedback, step_matrices
    from edgekv.reference import quant_torch as qt
    from edgekv.reference.model import _rotate_half
    from edgekv.rotation import hadamard

    loaded, shape, emp, keys = _feedback_codec.load()
    model = loaded.model
    n, d = shape.num_layers, shape.head_dim
    with torch.no_grad():
        sampled = capture(model, calibration_ids(loaded.tokenizer), fisher="sampled")
    h = torch.from_numpy(hadamard(d))
    hq, t_len, _ = emp.q[0].shape
    rep = hq // shape.num_kv_heads
    causal = torch.triu(torch.ones(t_len, t_len, dtype=torch.bool), 1)

    def gradient(layer, j):
        g = emp.grad[layer].view(-1, hq, d)
        rope = lambda x: x * emp.cos + _rotate_half(x) * emp.sin  # noqa: E731
        q, k = rope(emp.q[layer]), rope(emp.k[layer])
        m = torch.zeros(d, d)
        for hh in range(j * rep, (j + 1) * rep):
            a = torch.softmax((q[hh] @ k[j].T / d ** 0.5).masked_fill(causal, float("-inf")), -1)
            w = a.T @ g[:, hh]
            m += w.T @ w / t_len
        return m

    def fisher(layer, j):
        return torch.diag(sampled.grad_sq[layer].view(-1, hq, d)[:, j * rep:(j + 1) * rep].mean(0).sum(0))

    def o_proj(layer, j):
        w = model.model.layers[layer].self_attn.o_proj.weight.detach().float()
        w = torch.cat([w[:, hh * d:(hh + 1) * d] for hh in range(j * rep, (j + 1) * rep)], 0)
        return w.T @ w

    def matrices(weight, damp):
        m = np.array([[(h.T @ weight(i, j) @ h).double().numpy() for j in range(shape.num_kv_heads)]
                      for i in range(n)])
        return torch.from_numpy(step_matrices(m, damp))

    class Codec(_feedback_codec.feedback_keys_codec(keys)):
        def __init__(self, values=None):
            self.v = values

        def values(self, layer, x, bits, group):
            if self.v is None:
                return qt.fake_quantize_values(x, bits, group)
            g = x.reshape(*x.shape[:-1], -1, group)
            mn, mx = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            s, z = qt._scale_zero(mn, mx, bits)  # the format's fp16 scale and zero
            s, z = (a.float().expand_as(g).reshape(x.shape) for a in (s, z))
            codes = round_with_feedback(x, s, z, self.v[layer], lambda v, s, z: qt._codes(v, s, z, bits).float())
            return torch.cat(codes, -1) * s + z

    codecs = {"nearest": Codec(), "gradient (ridge 1 %)": Codec(matrices(gradient, 0.01)),
              "gradient (ridge 30 %)": Codec(matrices(gradient, 0.3)),
              "fisher": Codec(matrices(fisher, 0.01)), "o_proj": Codec(matrices(o_proj, 0.01))}
    rows, tokens = _feedback_codec.score(loaded, shape, codecs, [int(x) for x in args.bits.split(",")],
                                         args.max_tokens, args.sequences, "values")
    _feedback_codec.write(args.json, rows, tokens, args.sequences)
    print("\n| bits | value rounding | KL vs fp16 | Δppl |\n|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['bits']} | {r['values']} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
