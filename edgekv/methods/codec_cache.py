"""A reference cache whose ring goes through a `RingCodec`, stored as what attention reads.

Same counters, sinks, residual and eviction as CompressedKVCache (it is one); only the ring
differs: blocks are quantized by the codec the moment the residual fills and kept as
float32 dequantized values (rotated before the codec and un-rotated after it when the
policy rotates), so any method can be measured without a packed format of its own.
"""

from __future__ import annotations

import torch

from edgekv.methods.base import RingCodec, UniformCodec
from edgekv.policy import CachePolicy, KVShape
from edgekv.reference.cache import CompressedKVCache


class CodecCache(CompressedKVCache):
    def __init__(self, policy: CachePolicy, shape: KVShape, batch: int = 1,
                 context: int | None = None, codec: RingCodec | None = None) -> None:
        if policy.units:  # a codec quantizes whole layers (it would also widen every unit to 16 bits wrongly)
            raise ValueError("the codec caches take one width per layer (a policy without units)")
        self.codec = codec or UniformCodec()
        self.bits_k, self.bits_v = policy.bits_k, policy.bits_v
        # Allocated as a 16-bit ring (same slots), then widened to float32: dequantized values.
        fp = (16,) * policy.num_layers
        super().__init__(policy.with_(bits_k=fp, bits_v=fp), shape, batch, context)
        h = self.rotation
        self.rotation = {}  # the parent's view must not un-rotate: the ring is stored un-rotated
        self._h = h.get("k") if policy.rotation == "hadamard" else None

    def _allocate(self, layer: int, context: int | None = None) -> dict[str, torch.Tensor]:
        bufs = super()._allocate(layer, context)
        return {n: t.float() if n.startswith("ring") else t for n, t in bufs.items()}

    def _slot_for_next_block(self, layer: int) -> int:
        return self.blocks_pushed % self._slots(layer)

    def _push_block(self, layer: int) -> None:
        if self.policy.window is None and self.blocks_pushed >= self._slots(layer):
            self._grow(layer)
        c, b = self.layers[layer], self.policy.block
        slot = self._slot_for_next_block(layer)
        k, v = self.plain(layer, "residual_k", b), self.plain(layer, "residual_v", b)
        bk, bv = self.bits_k[layer], self.bits_v[layer]
        if bk != 16:
            k = self._unrotate(self._encode_keys(layer, self._rotate(k), bk))
        if bv != 16:
            v = self._unrotate(self._encode_values(layer, self._rotate(v), bv))
        c["ring_k"][:, :, slot] = k
        c["ring_v"][:, :, slot * b:(slot + 1) * b] = v

    def _encode_keys(self, layer: int, k: torch.Tensor, bits: int) -> torch.Tensor:
        """Hook for caches that quantize with what they observed (edgekv.methods.salient)."""
        return self.codec.keys(layer, k, bits)

    def _encode_values(self, layer: int, v: torch.Tensor, bits: int) -> torch.Tensor:
        return self.codec.values(layer, v, bits, self.policy.group)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._h is None else x @ self._h

    def _unrotate(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._h is None else x @ self._h.T


def attention_probs(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention [N, Hq, t, L+t] from what `observe_attention` receives: RoPE'd
    queries [N, Hq, t, D], the keys attention reads [N, Hkv, L+t, D] (grouped-query heads
    repeated) and the mask [t, L+t]."""
    rep = q.shape[1] // keys.shape[1]
    s = q @ keys.repeat_interleave(rep, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1)


def fit_codec(codec: RingCodec, model, tokenizer, policy: CachePolicy,
              widths: tuple[int, ...] = (2, 3, 4, 8)) -> RingCodec:
    """Fit `codec` on the calibration text (never the evaluation text): per layer, the
    ring-ready key blocks and value rows the cache would quantize."""
    from edgekv.calibration import _quantizable, calibration_ids, capture
    from edgekv.rotation import hadamard

    ids = calibration_ids(tokenizer)
    with torch.no_grad():
        cap = capture(model, ids, fisher="empirical")  # only k and v are read
    sl = _quantizable(len(ids), policy)
    b = policy.block
    h = torch.from_numpy(hadamard(cap.k[0].shape[-1])) if policy.rotation == "hadamard" else None
    keys, values = [], []
    for k, v in zip(cap.k, cap.v):
        k, v = k[:, sl], v[:, sl]  # [Hkv, n, D]
        if h is not None:
            k, v = k @ h, v @ h
        keys.append(k.reshape(-1, b, k.shape[-1]))
        values.append(v.reshape(-1, v.shape[-1]))
    codec.fit(keys, values, b, policy.group, widths)
    return codec


def method_model(model, policy: CachePolicy, codec: RingCodec | None = None,
                 cache_class: type[CodecCache] = CodecCache, **cache_kw):
    """A ReferenceModel whose caches are `cache_class` with `codec` (perplexity and passkey
    create their caches through `new_cache`)."""
    from edgekv.reference.model import ReferenceModel

    ref = ReferenceModel(model, policy)
    ref.new_cache = lambda batch=1, context=None: cache_class(  # type: ignore[method-assign]
        policy, ref.shape, batch, context, codec=codec, **cache_kw)
    return ref
