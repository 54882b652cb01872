"""A transformers Llama-family model run through the compressed cache.

The wrapper reuses the model's own modules (embeddings, norms, projections, MLP, rotary
embedding) and replaces only attention: new keys and values go into the compressed
cache pre-RoPE, and RoPE is applied at attention time to the dequantized cache with the
positions the policy assigns. New tokens' K/V are rounded before attention as they would
be when read back from the residual (`CompressedKVCache.read_back`), so a chunk of tokens gives the same
result as feeding them one at a time (tests/test_reference_model.py proves it).
"""

from __future__ import annotations

from typing import Iterator

import torch

from edgekv.errors import UnsupportedModelError
from edgekv.policy import CachePolicy, KVShape
from edgekv.reference.cache import CompressedKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def kv_shape(config) -> KVShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return KVShape(config.num_hidden_layers, config.num_key_value_heads, head_dim)


def check_supported(config) -> None:
    mt = getattr(config, "model_type", "?")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"unsupported architecture {mt!r}: edgekv handles {', '.join(SUPPORTED_MODEL_TYPES)} "
            f"(Llama-family decoders) for now")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceModel:
    """`forward` appends tokens to the cache and returns their logits."""

    def __init__(self, model, policy: CachePolicy) -> None:
        check_supported(model.config)
        self.model, self.policy = model.eval(), policy
        self.config = model.config
        self.shape = kv_shape(model.config)
        policy.check_shape(self.shape)
        self.num_heads = model.config.num_attention_heads

    def new_cache(self, batch: int = 1, context: int | None = None) -> CompressedKVCache:
        return CompressedKVCache(self.policy, self.shape, batch, context)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.model.model.rotary_emb(x, positions[None])
        cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: CompressedKVCache) -> torch.Tensor:
        """input_ids [N,T] -> logits [N,T,V] float32. Splits at block boundaries so any
        T is exact."""
        out, start = [], 0
        while start < input_ids.shape[1]:
            t = min(cache.room(), input_ids.shape[1] - start)
            out.append(self._segment(input_ids[:, start:start + t], cache))
            start += t
        return torch.cat(out, dim=1)

    def _segment(self, ids: torch.Tensor, cache: CompressedKVCache) -> torch.Tensor:
        m = self.model.model
        n, t = ids.shape
        h = m.embed_tokens(ids)
        pos_cache = cache.cache_positions()
        pos_new = cache.new_positions(t)
        pos_all = torch.cat([pos_cache, pos_new])
        length = pos_cache.shape[0]
        # Cached tokens are all visible; new tokens are causal among themselves.
        mask = torch.ones(t, length + t, dtype=torch.bool)
        mask[:, length:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
        hd, nkv = self.shape.head_dim, self.shape.num_kv_heads
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n, t, self.num_heads, hd).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, nkv, hd).transpose(1, 2)
            v = attn.v_proj(x).view(n, t, nkv, hd).transpose(1, 2)
            k, v = k.to(torch.float16), v.to(torch.float16)  # what the cache stores (append)
            ck, cv = cache.view(i)
            keys = self._rope(torch.cat([ck, cache.read_back(k)], dim=2), pos_all)
            vals = torch.cat([cv, cache.read_back(v)], dim=2)
            q = self._rope(q, pos_new)
            observe = getattr(cache, "observe_attention", None)  # eviction methods (edgekv.methods)
            if observe is not None:
                observe(i, q, keys, mask)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, keys, vals, attn_mask=mask, enable_gqa=True)
            cache.append(i, k, v)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(n, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        cache.commit(t)
        return self.model.lm_head(m.norm(h)).float()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 cache: CompressedKVCache | None = None,
                 eos_token_id: int | None = None) -> Iterator[int]:
        """Greedy decoding of one sequence; yields token ids as they are chosen."""
        cache = cache or self.new_cache(1)
        logits = self.forward(input_ids, cache)[:, -1]
        for _ in range(max_new_tokens):
            tok = int(logits.argmax(-1)[0])
            yield tok
            if eos_token_id is not None and tok == eos_token_id:
                return
            logits = self.forward(torch.tensor([[tok]]), cache)[:, -1]
