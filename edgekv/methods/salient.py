"""Salient tokens at full precision (ZipCache / MiKV): in every block, the `keep` tokens
with the highest normalized attention score (attention received / queries that could see
them, summed over the layer's heads) are stored exactly in fp16 and left out of the min/max
ranges of the others, which are quantized as usual. Cost: keep/B of the elements at 16
bits instead of b (keep/B x (16 - b) bits per element), plus a token index per kept token
(negligible, shared by the heads). One sequence per cache (which tokens are salient
differs per sequence)."""

from __future__ import annotations

import torch

from edgekv.methods.codec_cache import CodecCache, attention_probs
from edgekv.methods.outliers import _fake_quant


class SalientTokenCache(CodecCache):
    def __init__(self, *args, keep: int = 2, **kw) -> None:
        super().__init__(*args, **kw)
        if self.batch != 1:
            raise ValueError("SalientTokenCache holds one sequence")
        self.keep = keep
        b, n = self.policy.block, self.shape.num_layers
        self.mass = torch.zeros(n, b)  # attention received by the residual block's tokens
        self.viewers = torch.zeros(n, b)  # queries that could attend to each of them

    def observe_attention(self, layer: int, q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> None:
        if self.n_sink < self.policy.sinks:
            return
        p = attention_probs(q, keys, mask)  # [1, Hq, t, L+t]
        t = q.shape[2]
        first = keys.shape[2] - t - self.n_res  # the residual's first column
        cols = slice(0, self.n_res + t)  # their positions in the block
        self.mass[layer, cols] += p[..., first:].sum((0, 1, 2))
        self.viewers[layer, cols] += mask[:, first:].sum(0).float() * q.shape[1]

    def _push_block(self, layer: int) -> None:
        super()._push_block(layer)
        self.mass[layer].zero_()  # the next block starts unobserved
        self.viewers[layer].zero_()

    def _salient(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Mask [..., B, D] of the kept tokens' rows."""
        score = self.mass[layer] / self.viewers[layer].clamp_min(1)
        rows = torch.zeros(self.policy.block, dtype=torch.bool)
        rows[score.topk(self.keep).indices] = True
        return rows[:, None].expand(x.shape[-2:]).expand_as(x)

    def _encode_keys(self, layer: int, k: torch.Tensor, bits: int) -> torch.Tensor:
        return _fake_quant(k, self._salient(layer, k), bits, -2)

    def _encode_values(self, layer: int, v: torch.Tensor, bits: int) -> torch.Tensor:
        g = self.policy.group
        keep = self._salient(layer, v)
        grouped = lambda x: x.unflatten(-1, (x.shape[-1] // g, g))  # noqa: E731
        return _fake_quant(grouped(v), grouped(keep), bits, -1).flatten(-2)
