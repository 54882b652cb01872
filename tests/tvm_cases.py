"""Cache states and the reference attention for the TVM kernel tests.

A state is built by the torch reference cache (edgekv.reference.cache) from random
tokens, so sinks, ring slots, eviction and residual are exactly what the runtime holds;
the reference attention dequantizes with `view`, applies RoPE in float64 at
`cache_positions`, and runs a float64 masked softmax.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekv.policy import CachePolicy, KVShape, quantized_parts
from edgekv.reference.cache import CompressedKVCache
from edgekv.tvm_kernels.params import AttnParams
from edgekv.tvm_kernels.rope import RopeTables, inv_freq, rotate


def filled_cache(policy: CachePolicy, shape: KVShape, tokens: int, seed: int = 0) -> CompressedKVCache:
    g = torch.Generator().manual_seed(seed)
    cache = CompressedKVCache(policy, shape)
    left = tokens
    while left:
        t = min(cache.room(), left)
        for i in range(shape.num_layers):
            k = torch.randn(1, shape.num_kv_heads, t, shape.head_dim, generator=g) * 2 + 0.5
            v = torch.randn(1, shape.num_kv_heads, t, shape.head_dim, generator=g)
            cache.append(i, k, v)
        cache.commit(t)
        left -= t
    return cache


def kernel_case(policy: CachePolicy, shape: KVShape, num_heads: int, tokens: int, chunk: int = 1,
                seed: int = 0) -> tuple[AttnParams, list[np.ndarray], np.ndarray]:
    """Kernel arguments (layer 0, new tokens written into sinks/residual) and the
    reference output [1,Hq,C,D] for `chunk` new tokens after `tokens` cached ones."""
    cache = filled_cache(policy, shape, tokens, seed)
    rng = np.random.default_rng(seed + 1)
    h, d, c = shape.num_kv_heads, shape.head_dim, chunk
    q = rng.standard_normal((1, num_heads, c, d)).astype(np.float32)
    k = rng.standard_normal((1, h, c, d)).astype(np.float16)
    v = rng.standard_normal((1, h, c, d)).astype(np.float16)
    if c > cache.room():
        raise ValueError("the chunk must fit before the next boundary")
    freqs = inv_freq(d)
    pos_cache = cache.cache_positions().numpy()
    pos_new = cache.new_positions(c).numpy()
    # reference: float64 over the dequantized cache + the new tokens, causal in the chunk
    ck, cv = (x[0].double().numpy() for x in cache.view(0))
    keys = np.concatenate([ck, k[0].astype(np.float64)], 1)
    vals = np.concatenate([cv, v[0].astype(np.float64)], 1)
    keys = rotate(keys, np.concatenate([pos_cache, pos_new]), freqs).astype(np.float64)
    qr = rotate(q, pos_new, freqs)
    length = keys.shape[1]
    rep = num_heads // h
    ref = np.zeros((1, num_heads, c, d))
    for hq in range(num_heads):
        sc = qr[0, hq].astype(np.float64) @ keys[hq // rep].T / np.sqrt(d)  # [C, L]
        for i in range(c):
            valid = length - c + i + 1
            e = np.exp(sc[i, :valid] - sc[i, :valid].max())
            ref[0, hq, i] = (e / e.sum()) @ vals[hq // rep, :valid]

    layer = {n: t.numpy().copy() for n, t in cache.layers[0].items()}
    p = policy
    if cache.n_sink < p.sinks:
        layer["sink_k"][:, :, cache.n_sink:cache.n_sink + c] = k
        layer["sink_v"][:, :, cache.n_sink:cache.n_sink + c] = v
        counts = [cache.n_sink + c, cache.ring_filled, 0]
    else:
        layer["residual_k"][:, :, cache.n_res:cache.n_res + c] = k
        layer["residual_v"][:, :, cache.n_res:cache.n_res + c] = v
        counts = [cache.n_sink, cache.ring_filled, cache.n_res + c]
    slots = p.window // p.block
    params = AttnParams(num_heads, h, d, p.sinks, slots, p.block, p.group, p.bits_k[0], p.bits_v[0], c,
                        p.rotation == "hadamard", p.meta)
    tables = RopeTables(p, freqs, slots)
    tables.update(cache.n_sink, cache.blocks_pushed)
    ring_k = ["ring_k"] if params.bits_k == 16 else [f"ring_k_{n}" for n in quantized_parts(p.meta)]
    ring_v = ["ring_v"] if params.bits_v == 16 else [f"ring_v_{n}" for n in quantized_parts(p.meta)]
    args = [qr, layer["sink_k"], layer["sink_v"], layer["residual_k"], layer["residual_v"],
            *(layer[n] for n in ring_k), *(layer[n] for n in ring_v),
            tables.sink_cos, tables.sink_sin, tables.blk_cos, tables.blk_sin, tables.off_cos, tables.off_sin,
            np.array(counts, np.int32)]
    return params, args, ref.astype(np.float32)
