"""Do rotated keys still need per-channel scales? The shipped cache against the same cache
with its ring keys quantized per token (like values) after the Hadamard rotation.

KIVI quantizes keys per channel because pre-RoPE keys have a few large channels; the ring's
Hadamard rotation spreads those over all channels, which is what lets QuaRot-style caches
quantize keys per token. Per token, one scale/zero per 64 channels costs half the key
metadata of one per channel over a 32-token block: 6,144 bytes per SmolLM2 layer at W1024,
2.7 % of a 3-bit cache (0.232x -> 0.224x of fp16). Modes:

    tok32   keys per token in groups of 32 channels (8-bit scale/zero, block meta like the
            values'): the same bytes as shipped
    tok64   one scale/zero per token and KV head: -6,144 bytes per layer
    tok64c  tok64 with the values' calibrated range clipping at the same width
    chan    the control: per channel as shipped, through the same substitution (must
            score as shipped)

Simulated in the reference cache: the ring's keys are also kept as their per-token
dequantization and attention reads those instead (query-aware key rounding, which needs
per-channel grids, does not apply). The layouts are the shipped calibration's (measured
with per-channel keys), so a per-token cache calibrated for itself could only do better.
The byte column is the shipped cache's; the per-token savings are stated above.

    .venv/bin/python bench/key_axis.py [--bits 2,3,4] [--modes tok32,tok64,tok64c]
"""

import _layouts
import torch

from edgekv.reference import quant_torch as qt
from edgekv.reference.cache import CompressedKVCache
from edgekv.reference.model import ReferenceModel

MODES = {"tok32": (32, None), "tok64": (64, None), "tok64c": (64, "v"), "chan": (None, "k")}  # group, clip side


class TokenKeyCache(CompressedKVCache):
    """Writes the ring as shipped, and keeps a per-token fake quantization of each pushed
    block's rotated keys that `view` returns in place of the per-channel ones."""

    def __init__(self, policy, shape, batch, context, mode):
        super().__init__(policy, shape, batch, context)
        self.group, self.clip_side = MODES[mode]
        self.token_keys: dict[int, torch.Tensor] = {}

    def _push_block(self, layer):
        p = self.policy
        bk = p.bits_k[layer]
        if bk != 16:
            b, slots = p.block, self._slots(layer)
            rk = self.plain(layer, "residual_k", b) @ self.rotation["k"]
            clip = p.clip_ratio(self.clip_side, bk) if self.clip_side else 1.0
            if self.group is None:
                fb = None if self.key_feedback is None else self.key_feedback[layer]
                fq = qt.fake_quantize_keys(rk, bk, p.meta, clip, fb)
            else:
                fq = qt.fake_quantize_values(rk, bk, self.group, p.meta, block=b, clip=clip)
            if layer not in self.token_keys:
                self.token_keys[layer] = torch.zeros(*rk.shape[:2], slots * b, rk.shape[-1])
            slot = self.blocks_pushed % slots
            self.token_keys[layer][:, :, slot * b:(slot + 1) * b] = fq
        super()._push_block(layer)

    def view(self, layer):
        k, v = super().view(layer)
        order = self._ring_order()
        if self.policy.bits_k[layer] == 16 or not order:
            return k, v
        b = self.policy.block
        tok = (torch.tensor(order)[:, None] * b + torch.arange(b)).reshape(-1)
        k = k.clone()
        k[:, :, self.n_sink:self.n_sink + len(tok)] = self.token_keys[layer][:, :, tok] @ self.rotation["k"].T
        return k, v

    def reset(self):
        super().reset()
        self.token_keys.clear()


class TokenKeyModel(ReferenceModel):
    def __init__(self, model, policy, mode):
        super().__init__(model, policy)
        self.mode = mode

    def new_cache(self, batch=1, context=None):
        return TokenKeyCache(self.policy, self.shape, batch, context, self.mode)


def main() -> None:
    ap = _layouts.shipped_parser(__doc__, "bench/results/key-axis-smollm2.json")
    ap.set_defaults(bits="2,3,4")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    _layouts.score_modes(args, TokenKeyModel)


if __name__ == "__main__":
    main()
