"""Keys in a calibrated basis with a width per component (an experiment, not a format;
BENCHMARKS.md "Keys with a width per component").

Transform coding: the pre-RoPE keys of a KV head are far from isotropic (0.5 log2 of the
arithmetic over the geometric mean of their covariance eigenvalues is 0.45-2.9 bits per
layer on the calibration text), so giving more bits to strong directions and fewer (or
none) to weak ones could beat the shipped Hadamard rotation with one width per layer.
Every codec here gets the same code bits per key element as the uniform cache (per layer:
bits x head_dim per key vector, integer widths 0-8 per component by greedy water-filling on
the component's variance) and the same per-channel fp16 scale/zero per block (a width-0
component is read back as its block mean, which the zero can hold):

  hadamard            the shipped rotation, nearest rounding
  hadamard+feedback   the shipped rotation and rounding (edgekv.key_feedback)
  klt-weighted        a dense basis per layer and KV head: eigenvectors of M^1/2 C M^1/2
                      (C the keys' covariance, M the RoPE-seen queries' second moment of
                      edgekv.calibration.key_weights), so widths follow what queries read
  klt-weighted-mix    the same, each equal-width set of components mixed by a fixed random
                      orthogonal matrix (Gaussianises it, as the Hadamard does)
  klt-weighted-mix-w4 the same with widths capped at 4
  group8 / group16    a cheap form: channels sorted by variance x diag(M), groups of 8 or
                      16 with one width each and a Hadamard inside each group
  group8-fb           group8 with the shipped error feedback in that basis

Values stay fp16 so the rows measure keys alone. Reference backend with ring codecs,
window 1024 + 4 sinks, block 32; KL and Δppl against the fp16 cache with the same window,
in lockstep; calibration text only for every fit.

    .venv/bin/python bench/key_transforms.py [--bits 2] [--max-tokens 2048] [--sequences 2] [--codecs a,b]
"""

import argparse
import json
from pathlib import Path

CODECS = ("hadamard", "hadamard+feedback", "klt-weighted", "klt-weighted-mix", "klt-weighted-mix-w4",
          "group8", "group16", "group8-fb")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--json", default="bench/results/key-transforms-smollm2.json")
    args = ap.parse_args()
    import numpy as np
    import torch

    from edgekv.calibration import calibration_ids, capture, key_feedback, key_weights
    from edgekv.export.model_loading import load_model
    from edgekv.key_feedback import round_with_feedback, step_matrices
    from edgekv.methods.base import RingCodec
    from edgekv.methods.codec_cache import method_model
    from edgekv.policy import CachePolicy
    from edgekv.quality.divergence import divergences
    from edgekv.quality.text import evaluation_text
    from edgekv.reference import quant_torch as qt
    from edgekv.reference.model import kv_shape
    from edgekv.rotation import hadamard

    loaded = load_model("default")
    model, shape = loaded.model, kv_shape(loaded.model.config)
    n, d, hkv = shape.num_layers, shape.head_dim, shape.num_kv_heads

    def policy(b, rotation="hadamard"):
        return CachePolicy.uniform(n, bits_k=b, bits_v=16, window=1024, sinks=4, block=32, group=32, rotation=rotation)

    with torch.no_grad():
        cap = capture(model, calibration_ids(loaded.tokenizer), fisher="empirical")
    shipped = key_feedback(model, cap, policy(3))
    m_pre = key_weights(model, cap, policy(3, "none")).double()  # [L, H, D, D], pre-RoPE basis
    h_full = torch.from_numpy(hadamard(d)).double()

    def water_fill(var: torch.Tensor, total: int, cap_bits: int = 8) -> torch.Tensor:
        w = torch.zeros(len(var), dtype=torch.long)
        for _ in range(total):
            gain = var * (4.0 ** -w.double() - 4.0 ** -(w.double() + 1))
            gain[w >= cap_bits] = -1
            w[int(gain.argmax())] += 1
        return w

    def quantize(y: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Per-component widths, nearest rounding, per-channel fp16 grid over the block."""
        out = torch.empty_like(y)
        for b in widths.unique().tolist():
            idx = (widths == b).nonzero().flatten()
            part = y[..., idx]
            out[..., idx] = (part.mean(-2, keepdim=True).expand_as(part) if b == 0
                             else qt.fake_quantize_keys(part.float(), b).double())
        return out

    class Basis(RingCodec):
        """k (pre-RoPE) -> y = k @ fwd, widths per component of y, back = fwd^-1."""

        def __init__(self) -> None:
            self.fwd, self.back, self.var, self.widths = {}, {}, {}, {}

        def keys(self, layer, x, bits):
            x = x.double() @ h_full  # the ring hands over Hadamard-rotated keys
            out = torch.empty_like(x)
            for h in range(hkv):
                key = (layer, h, bits)
                if key not in self.widths:
                    self.widths[key] = self.allocate(layer, h, bits)
                y = x[..., h, :, :] @ self.fwd[layer, h]
                out[..., h, :, :] = self.code(layer, h, y, self.widths[key]) @ self.back[layer, h]
            return (out @ h_full).float()

        def allocate(self, layer, h, bits):
            return water_fill(self.var[layer, h], bits * d, self.cap_bits)

        def code(self, layer, h, y, widths):
            return quantize(y, widths)

    class KLT(Basis):
        def __init__(self, mix: bool, cap_bits: int = 8) -> None:
            super().__init__()
            self.cap_bits = cap_bits
            for (layer, h), (s, si) in whitening().items():
                k = cap.k[layer][h].double()
                c = torch.cov(k.T)
                ev, u = torch.linalg.eigh(s @ c @ s)
                order = ev.argsort(descending=True)
                ev, u = ev[order].clamp_min(1e-12), u[:, order]
                fwd = s @ u
                widths = water_fill(ev, 2 * d, cap_bits)  # the mixing sets follow the 2-bit widths
                if mix:
                    r = torch.eye(d, dtype=torch.double)
                    for b in widths.unique().tolist():
                        idx = (widths == b).nonzero().flatten()
                        if len(idx) > 1:
                            g = torch.Generator().manual_seed(len(idx))
                            q, _ = torch.linalg.qr(torch.randn(len(idx), len(idx), generator=g, dtype=torch.double))
                            r[idx[:, None], idx] = q
                    fwd = fwd @ r
                    ev = torch.einsum("ij,jk,ki->i", fwd.T, c, fwd)  # variances after mixing
                self.fwd[layer, h], self.back[layer, h], self.var[layer, h] = fwd, torch.linalg.inv(fwd), ev

    def whitening():
        out = {}
        for layer in range(n):
            for h in range(hkv):
                m = m_pre[layer, h] + 1e-3 * torch.trace(m_pre[layer, h]) / d * torch.eye(d, dtype=torch.double)
                ev, vec = torch.linalg.eigh(m)
                out[layer, h] = (vec @ torch.diag(ev.sqrt()) @ vec.T, vec @ torch.diag(ev.rsqrt()) @ vec.T)
        return out

    class Grouped(Basis):
        def __init__(self, g: int, feedback: bool = False) -> None:
            super().__init__()
            self.g, self.cap_bits, self.steps = g, 8, {}
            hg = torch.block_diag(*[torch.from_numpy(hadamard(g)).double()] * (d // g))
            for layer in range(n):
                for h in range(hkv):
                    k = cap.k[layer][h].double()
                    imp = k.var(0) * m_pre[layer, h].diagonal()
                    order = imp.argsort(descending=True)
                    fwd = torch.eye(d, dtype=torch.double)[:, order] @ hg
                    self.fwd[layer, h], self.back[layer, h] = fwd, fwd.T
                    self.var[layer, h] = imp[order].reshape(-1, g).sum(1)
                    if feedback:
                        self.steps[layer, h] = torch.from_numpy(step_matrices((fwd.T @ m_pre[layer, h] @ fwd).numpy())).float()

        def allocate(self, layer, h, bits):
            return water_fill(self.var[layer, h], bits * d // self.g).repeat_interleave(self.g)

        def code(self, layer, h, y, widths):
            if not self.steps:
                return quantize(y, widths)
            y = y.float()
            levels = (2 ** widths - 1).float()
            mn, mx = y.amin(-2, keepdim=True), y.amax(-2, keepdim=True)
            s = torch.where(widths > 0, (mx - mn) / levels.clamp_min(1), torch.zeros_like(mx)).half().float()
            z = torch.where(widths > 0, mn, y.mean(-2, keepdim=True)).half().float()
            at = [0]

            def codes(v, s_, z_):  # nearest on each channel's own width, in round_with_feedback's order
                a, at[0] = at[0], at[0] + v.shape[-1]
                q = torch.round((v - z_) / torch.where(s_ > 0, s_, torch.ones_like(s_)))
                return torch.minimum(torch.where(s_ > 0, q, torch.zeros_like(q)).clamp_min(0), levels[a:at[0]])

            q = torch.cat(round_with_feedback(y, s, z, self.steps[layer, h], codes), -1)
            return (q * s + z).double()

    class Shipped(RingCodec):
        def __init__(self, feedback: bool) -> None:
            self.feedback = feedback

        def keys(self, layer, x, bits):
            f = torch.from_numpy(shipped.layer(layer).copy()) if self.feedback else None
            return qt.fake_quantize_keys(x, bits, feedback=f)

    make = {"hadamard": lambda: Shipped(False), "hadamard+feedback": lambda: Shipped(True),
            "klt-weighted": lambda: KLT(False), "klt-weighted-mix": lambda: KLT(True),
            "klt-weighted-mix-w4": lambda: KLT(True, 4), "group8": lambda: Grouped(8),
            "group16": lambda: Grouped(16), "group8-fb": lambda: Grouped(8, True)}
    names = args.codecs.split(",")
    codecs = [make[c]() for c in names]
    ids = loaded.tokenizer(evaluation_text()).input_ids[:args.max_tokens]
    scores = divergences(method_model(model, policy(16)), [method_model(model, policy(args.bits), c) for c in codecs],
                         ids, sequences=args.sequences)
    rows = [{"codec": c, "bits_k": args.bits, "kl": r.kl, "delta_pct": r.delta_pct} for c, r in zip(names, scores)]
    gains = []
    for layer in range(n):
        for h in range(hkv):
            ev = torch.linalg.eigvalsh(torch.cov(cap.k[layer][h].double().T)).clamp_min(1e-12)
            gains.append(float(0.5 * torch.log2(ev.mean() / ev.log().mean().exp())))
    out = {"tokens": len(ids), "sequences": args.sequences, "values": "fp16", "rows": rows,
           "coding_gain_bits_per_layer": np.round(np.array(gains).reshape(n, hkv).mean(1), 3).tolist()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print("\n| key codec | K bits | KL vs fp16 | Δppl |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['bits_k']} | {r['kl']:.5f} | {r['delta_pct']:+.2f} % |")


if __name__ == "__main__":
    main()
