"""Eviction by importance (H2O heavy hitters) at block granularity, against the sliding
window at equal bytes: the ring keeps the same number of blocks, but when it is full the
block pushed out is not the oldest one. The newest `recent` fraction of the ring's blocks
is always kept (H2O's local window); among the others the block that has received the
least attention so far (summed over every later query and every head of the layer) is
evicted. Sinks are kept as always. Blocks stay in position order, so RoPE positions are
those of the sliding window's cache. One sequence per cache: every sequence would evict
different blocks."""

from __future__ import annotations

import torch

from edgekv.methods.codec_cache import CodecCache, attention_probs


class HeavyHitterCache(CodecCache):
    def __init__(self, *args, recent: float = 0.5, **kw) -> None:
        super().__init__(*args, **kw)
        if self.batch != 1:
            raise ValueError("HeavyHitterCache holds one sequence (eviction differs per sequence)")
        self.recent = recent
        self._layer = 0  # the layer `view` last read: `_ring_order` answers for it
        n = self.shape.num_layers
        self.slot_block = [dict() for _ in range(n)]  # slot -> block number it holds
        self.block_score = [dict() for _ in range(n)]  # block number -> attention received

    def view(self, layer: int):
        self._layer = layer  # each layer evicts its own blocks, so the ring order is per layer
        return super().view(layer)

    def _ring_order(self) -> list[int]:
        held = self.slot_block[self._layer]
        return sorted(held, key=held.get)

    def _slot_for_next_block(self, layer: int) -> int:
        held, slots = self.slot_block[layer], self._slots(layer)
        new = self.blocks_pushed
        if len(held) < slots:
            slot = len(held)
        else:
            keep_recent = max(1, int(round(self.recent * slots)))
            old = sorted(held, key=held.get)[: slots - keep_recent]
            slot = min(old, key=lambda s: self.block_score[layer].get(held[s], 0.0)) if old \
                else min(held, key=held.get)
            self.block_score[layer].pop(held[slot], None)
        held[slot] = new
        return slot

    def observe_attention(self, layer: int, q: torch.Tensor, keys: torch.Tensor,
                          mask: torch.Tensor) -> None:
        """Called by ReferenceModel with RoPE'd queries [1,Hq,t,D], the keys attention reads
        [1,Hkv,L+t,D] (cache order, then the new tokens) and the mask [t, L+t]."""
        p = attention_probs(q, keys, mask).sum((0, 1, 2))  # [L+t]
        b, start = self.policy.block, self.n_sink
        scores = self.block_score[layer]
        order = self._ring_order()
        for j, slot in enumerate(order):
            blk = self.slot_block[layer][slot]
            scores[blk] = scores.get(blk, 0.0) + float(p[start + j * b:start + (j + 1) * b].sum())
        if self.n_sink == self.policy.sinks:  # the residual and the new tokens: the next block
            blk = self.blocks_pushed
            scores[blk] = scores.get(blk, 0.0) + float(p[start + len(order) * b:].sum())
