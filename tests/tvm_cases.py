"""Cache states and the reference attention for the TVM kernel tests.

A state is built by the torch reference cache (edgekv.reference.cache) from random
tokens, so sinks, ring slots, eviction and residual are exactly what the runtime holds;
the reference attention dequantizes with `view`, applies RoPE in float64 at
`cache_positions`, and runs a float64 masked softmax. The new tokens are written the way
the cache stores them (fp16, or 8-bit with policy.residual "u8") and read back likewise.
"""

from __future__ import annotations

import numpy as np
import torch

from edgekv.policy import CachePolicy, KVShape
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
    nk, nv = (cache.read_back(torch.from_numpy(x))[0].double().numpy() for x in (k, v))
    keys = np.concatenate([ck, nk], 1)
    vals = np.concatenate([cv, nv], 1)
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

    p = policy
    sink = cache.n_sink < p.sinks
    part, at = ("sink", cache.n_sink) if sink else ("residual", cache.n_res)
    for side, x in (("k", k), ("v", v)):  # the cache's own write, without append's block push
        cache._write_plain(0, f"{part}_{side}", at, torch.from_numpy(x))
    counts = [cache.n_sink + c, cache.ring_filled, 0] if sink else [cache.n_sink, cache.ring_filled, cache.n_res + c]
    layer = {n: t.numpy().copy() for n, t in cache.layers[0].items()}
    slots = p.window // p.block
    params = AttnParams(num_heads, h, d, p.sinks, slots, p.block, p.group, p.bits_k[0], p.bits_v[0], c,
                        p.rotation == "hadamard", p.meta, p.residual)
    tables = RopeTables(p, freqs, slots)
    tables.update(cache.n_sink, cache.blocks_pushed)
    assert params.cache_names == list(layer)  # every buffer of the layer, in CachePolicy.layer_tensors' order
    args = [qr, *(layer[n] for n in params.cache_names),
            tables.sink_cos, tables.sink_sin, tables.blk_cos, tables.blk_sin, tables.off_cos, tables.off_sin,
            np.array(counts, np.int32)]
    return params, args, ref.astype(np.float32)
