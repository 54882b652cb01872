"""Where the sinks/residual bytes can and cannot be cut: the shipped cache against the same
cache with its newest tokens (the residual) or sinks rounded more coarsely, on the reading
side only.

The sinks and the residual (the newest < B tokens, not yet quantized into a ring block)
cost 0.019x of fp16 at W1024: 8 % of a 3-bit cache. This measures, for the shipped layout
of each `--bits` (calibrated as `edgekv export` would), what attention loses when those
tokens are read back as:

    ringv      the residual's values at the layer's ring width (rotated, clipped, per-token
               fp16 scale/zero): values need no block, so they could skip the residual
    ringv+1    the same one width up
    res6       sinks and residual at 6 bits per token (groups of G) instead of 8
    res8g64    8 bits with one scale/zero per token and KV head (the "u8h" format)
    sharedmeta ring blocks' 8-bit meta (lo, dz, top) shared by the KV heads ("u8s")
    both       res8g64 and sharedmeta
    res8g64r   res8g64 after a Hadamard rotation along head_dim (undone when read), so one
               per-head scale is not spent on a few outlier channels
    bothr      res8g64r and sharedmeta
    bothr-s8   bothr, but the sinks as shipped (8 bits, scale/zero per G channels)
    bothr-s16  bothr, but the sinks in fp16

The modes are simulated in the reference cache (the ring is written exactly as shipped;
only what attention reads from the sinks/residual, or the ring's meta, changes), so the
byte column is the shipped cache's; `edgekv eval --meta u8s --residual u8h` measures the
real formats. All rows run in lockstep with one fp16 cache over the evaluation text.

    .venv/bin/python bench/residual_precision.py [--bits 2,3] [--modes ringv,res6,...]
"""

import _layouts
import torch

from edgekv.reference import quant_torch as qt
from edgekv.reference.cache import CompressedKVCache
from edgekv.reference.model import ReferenceModel

MODES = ("ringv", "ringv+1", "res6", "res8g64", "sharedmeta", "both", "res8g64r", "bothr", "bothr-s8", "bothr-s16")
ROTATED = {"res8g64r", "bothr", "bothr-s8", "bothr-s16"}  # the sinks/residual rounded after x @ H
PER_HEAD = {"res8g64", "both"} | ROTATED  # one scale/zero per token and head
SHARED_META = {"sharedmeta", "both", "bothr", "bothr-s8", "bothr-s16"}


def _rounded(x, bits, group, d):
    return qt.dequantize_values(*qt.quantize_values(x, bits, group)[:3], bits, group, d)


class RoundedCache(CompressedKVCache):
    """Holds sinks/residual in fp16 (its policy says fp16) and rounds them when read, per `mode`."""

    def __init__(self, policy, shape, batch, context, mode):
        super().__init__(policy, shape, batch, context)
        from edgekv.rotation import hadamard

        self.h = torch.from_numpy(hadamard(shape.head_dim)).float()
        self.mode, self._layer, self._side, self._pushing = mode, 0, 0, False

    def _round(self, part, side, layer, x):
        p, g, d = self.policy, self.policy.group, x.shape[-1]
        if part == "sink" and self.mode == "bothr-s16":
            return x
        if part == "sink" and self.mode == "bothr-s8":
            return _rounded(x, 8, g, d)
        if self.mode in PER_HEAD:
            g = d
        if self.mode in ROTATED:
            return _rounded(x @ self.h, 8, g, d) @ self.h.T
        if self.mode == "res6":
            return _rounded(x, 6, g, d)
        if self.mode.startswith("ringv") and part == "residual" and side == "v" and not self._pushing:
            bv = p.bits_v[layer]
            bv = {2: 3, 3: 4, 4: 5, 5: 6}.get(bv, bv) if self.mode == "ringv+1" else bv
            if bv == 16:
                return x
            gv = p.value_group(layer)
            q = qt.quantize_values(x @ self.h, bv, gv, "fp16", p.clip_ratio("v", bv))
            return qt.dequantize_values(*q[:3], bv, gv, d) @ self.h.T
        return _rounded(x, 8, g, d)

    def view(self, layer):
        self._layer, self._side = layer, 0
        return super().view(layer)

    def read_back(self, x):  # the model calls it for k, then v, after view(layer)
        side = "kv"[self._side]
        self._side ^= 1
        part = "sink" if self.n_sink < self.policy.sinks else "residual"
        return self._round(part, side, self._layer, x.to(torch.float16).float())

    def plain(self, layer, name, n):
        part, side = name.split("_")
        return self._round(part, side, layer, self.layers[layer][name][:, :, :n].float())

    def _push_block(self, layer):
        """The ring is written from the 8-bit residual as shipped; "u8s" modes share meta."""
        self._pushing = True
        encode = qt.encode_u8
        if self.mode in SHARED_META:
            qt.encode_u8 = lambda mn, mx, bits, axes, shared=None: _shared_per_head(encode, mn, mx, bits, axes)
        try:
            super()._push_block(layer)
        finally:
            self._pushing = False
            qt.encode_u8 = encode


def _shared_per_head(encode, mn, mx, bits, axes):
    """encode with the meta shared over the heads (axis 1 of the cache's [N,H,...] blocks),
    then repeated per head so the cache's per-head meta buffers hold it."""
    sc, zc, m = encode(mn, mx, bits, axes, 1)
    return sc, zc, m.expand(*mn.shape[:2], *m.shape[2:])


class RoundedModel(ReferenceModel):
    def __init__(self, model, policy, mode):
        super().__init__(model, policy.with_(residual="fp16"))
        self.mode = mode

    def new_cache(self, batch=1, context=None):
        return RoundedCache(self.policy, self.shape, batch, context, self.mode)


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/residual-precision-smollm2.json")
    ap.set_defaults(bits="2,3", meta="u8", residual="u8")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    _layouts.score_modes(args, RoundedModel)


if __name__ == "__main__":
    main()
