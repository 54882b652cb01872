import numpy as np
import pytest
import torch

from edgekv import quant
from edgekv.policy import CachePolicy, KVShape
from edgekv.reference.cache import CompressedKVCache
from edgekv.rotation import rotate_exact

SHAPE = KVShape(num_layers=2, num_kv_heads=2, head_dim=16)


def _feed(cache, kv, step):
    """Append kv [N,H,T,D] in steps that never cross a boundary; return tokens fed."""
    t = 0
    while t < kv.shape[2]:
        n = min(step, cache.room(), kv.shape[2] - t)
        for layer in range(SHAPE.num_layers):
            cache.append(layer, kv[:, :, t:t + n], kv[:, :, t:t + n] * -1)
        cache.commit(n)
        t += n


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8, 16])
def test_bytes_reported_equal_bytes_allocated(bits):
    p = CachePolicy.uniform(2, bits, window=64, sinks=4, block=8, group=8)
    assert CompressedKVCache(p, SHAPE, batch=1).nbytes == p.total_bytes(SHAPE)
    assert CompressedKVCache(p, SHAPE, batch=3).nbytes == 3 * p.total_bytes(SHAPE)


@pytest.mark.parametrize("bits", [2, 3, 16])
@pytest.mark.parametrize("step", [1, 5, 8])
def test_eviction_keeps_sinks_and_newest_tokens(bits, step):
    p = CachePolicy.uniform(2, bits, window=32, sinks=4, block=8, group=8)
    cache = CompressedKVCache(p, SHAPE)
    total = 4 + 8 * 9 + 5  # 9 blocks pushed into a 4-block ring, 5 tokens in the residual
    kv = torch.randn(1, 2, total, 16).to(torch.float16).float()
    _feed(cache, kv, step)
    assert cache.length == 4 + 32 + 5 and cache.seen == total
    k, v = cache.view(1)
    # Sinks and residual are exact fp16; the ring holds the 4 newest complete blocks.
    torch.testing.assert_close(k[:, :, :4], kv[:, :, :4], rtol=0, atol=0)
    torch.testing.assert_close(k[:, :, -5:], kv[:, :, -5:], rtol=0, atol=0)
    ring_src = kv[:, :, total - 5 - 32: total - 5]
    if bits == 16:
        torch.testing.assert_close(k[:, :, 4:36], ring_src, rtol=0, atol=0)
    else:
        expect = quant.dequantize_keys(quant.quantize_keys(
            ring_src.numpy().reshape(1, 2, 4, 8, 16), bits), bits, 8).reshape(1, 2, 32, 16)
        np.testing.assert_allclose(k[:, :, 4:36].numpy(), expect, atol=1e-6)
    # Values were written as -kv; their error stays within the quantization bound.
    assert (v[:, :, 4:36] + ring_src).abs().max() < (2.0 if bits == 2 else 0.8)
    assert cache.cache_positions().tolist() == list(range(41))
    assert cache.new_positions(2).tolist() == [41, 42]


@pytest.mark.parametrize("residual,rg", [("u8", 8), ("u8h", 16), ("u8hr", 16)])
@pytest.mark.parametrize("bits", [3, 16])
def test_u8_residual_stores_sinks_and_residual_as_8_bit_codes(bits, residual, rg):
    """residual "u8"/"u8h"/"u8hr": the sinks and the residual read back as numpy's 8-bit per-token
    quantization (groups of G, or of the whole head, of the Hadamard-rotated tokens with "u8hr",
    un-rotated, both in float64) of what was appended (exactly), the
    ring blocks as quantized from those read-back values, and the bytes fall by what the
    policy says."""
    kw = dict(window=32, sinks=4, block=8, group=8)
    p = CachePolicy.uniform(2, bits, residual=residual, **kw)
    cache = CompressedKVCache(p, SHAPE)
    assert cache.nbytes == p.total_bytes(SHAPE) < CachePolicy.uniform(2, bits, **kw).total_bytes(SHAPE)
    total = 4 + 8 * 9 + 5
    kv = torch.randn(1, 2, total, 16).to(torch.float16).float()
    _feed(cache, kv, 3)
    k, _ = cache.view(1)

    def rot(x):  # "u8hr": x @ H in float64, rounded to float32, as every backend does
        return rotate_exact(x) if residual == "u8hr" else x

    def u8(x):
        return rot(quant.dequantize_values(quant.quantize_values(rot(x.numpy()), 8, rg), 8, rg, 16))
    np.testing.assert_array_equal(k[:, :, :4].numpy(), u8(kv[:, :, :4]))
    np.testing.assert_array_equal(k[:, :, -5:].numpy(), u8(kv[:, :, -5:]))
    assert 0 < (k[:, :, -5:] - kv[:, :, -5:]).abs().max() < 0.02  # 8-bit steps of a ~6-wide range
    ring_src = torch.from_numpy(u8(kv[:, :, total - 5 - 32: total - 5]))
    if bits == 16:
        torch.testing.assert_close(k[:, :, 4:36], ring_src.to(torch.float16).float(), rtol=0, atol=0)
    else:
        expect = quant.dequantize_keys(quant.quantize_keys(
            ring_src.numpy().reshape(1, 2, 4, 8, 16), bits), bits, 8).reshape(1, 2, 32, 16)
        np.testing.assert_allclose(k[:, :, 4:36].numpy(), expect, atol=1e-6)


def test_original_positions_follow_the_evicted_stream():
    p = CachePolicy.uniform(2, 4, window=16, sinks=2, block=8, group=8, positions="original")
    cache = CompressedKVCache(p, SHAPE)
    _feed(cache, torch.randn(1, 2, 2 + 8 * 5 + 3, 16), 8)
    pos = cache.cache_positions().tolist()
    assert pos == [0, 1] + list(range(2 + 24, 2 + 40)) + [42, 43, 44]
    assert cache.new_positions(1).tolist() == [45]


def test_append_across_a_boundary_is_refused():
    p = CachePolicy.uniform(2, 4, window=16, sinks=2, block=8, group=8)
    cache = CompressedKVCache(p, SHAPE)
    with pytest.raises(ValueError, match="boundary"):
        cache.append(0, torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))


def test_windowless_cache_grows_and_keeps_everything():
    p = CachePolicy.uniform(2, 16, window=None, sinks=4, block=8, group=8)
    cache = CompressedKVCache(p, SHAPE)
    kv = torch.randn(1, 2, 100, 16).to(torch.float16).float()
    _feed(cache, kv, 7)
    k, _ = cache.view(0)
    torch.testing.assert_close(k, kv, rtol=0, atol=0)


def test_per_layer_value_groups_quantize_each_ring_with_its_own_group():
    """groups_v: layer 0's ring values share a scale/zero over 16 channels, layer 1's over 8;
    each reads back as numpy's value quantization at that group (exactly), and the bytes
    are what the policy lists."""
    p = CachePolicy.uniform(2, 3, window=32, sinks=4, block=8, group=8, groups_v=(16, 8))
    assert p.value_group(0) == 16 and p.value_group(1) == 8 and "Gv=8x1,16x1" in p.describe()
    cache = CompressedKVCache(p, SHAPE)
    assert cache.nbytes == p.total_bytes(SHAPE) < CachePolicy.uniform(2, 3, window=32, sinks=4, block=8,
                                                                       group=8).total_bytes(SHAPE)
    total = 4 + 8 * 2 + 3
    kv = torch.randn(1, 2, total, 16).to(torch.float16).float()
    _feed(cache, kv, 5)
    src = -kv[:, :, 4:20].numpy()
    for layer, g in ((0, 16), (1, 8)):
        _, v = cache.view(layer)
        expect = quant.dequantize_values(quant.quantize_values(src, 3, g), 3, g, 16)
        np.testing.assert_allclose(v[:, :, 4:20].numpy(), expect, atol=1e-6)
        other = quant.dequantize_values(quant.quantize_values(src, 3, 24 - g), 3, 24 - g, 16)
        assert np.abs(v[:, :, 4:20].numpy() - other).max() > 1e-3  # the group reaches the quantizer
