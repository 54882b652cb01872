"""Accuracy methods (edgekv.methods) against the reference cache and plain references."""

import math
import pytest
import torch

from edgekv.methods import CODECS, CodebookCodec, OutlierCodec, UniformCodec
from edgekv.methods.codebook import kmeans_levels
from edgekv.methods.codec_cache import method_model
from edgekv.methods.heavy_hitters import HeavyHitterCache
from edgekv.policy import CachePolicy
from edgekv.reference import quant_torch as qt
from edgekv.reference.model import ReferenceModel

# CodecCache keeps the dequantized ring in float32 where the packed cache keeps codes and
# fp16 scale/zero and dequantizes on read: the same numbers up to summation order.
ATOL = 1e-4


def _policy(bits_k=(3, 2), bits_v=(4, 8), **kw):
    base = dict(window=32, sinks=4, block=8, group=8)
    base.update(kw)
    return CachePolicy(bits_k=bits_k, bits_v=bits_v, **base)


def _ids(n=90, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rotation,residual", [("none", "fp16"), ("hadamard", "fp16"), ("hadamard", "u8"),
                                               ("none", "u8hr"), ("hadamard", "u8hr")])
def test_uniform_codec_cache_equals_the_packed_cache(tiny_model, rotation, residual):
    """The method caches reuse the packed cache's sinks/residual (any storage) and rotation."""
    policy = _policy(rotation=rotation).with_(residual=residual)
    ids = _ids()
    packed = ReferenceModel(tiny_model, policy)
    expect = packed.forward(ids, packed.new_cache())
    got = method_model(tiny_model, policy, UniformCodec())
    out = got.forward(ids, got.new_cache())
    assert (out - expect).abs().max() < ATOL
    # The ring evicted (90 tokens > 4 sinks + 32 window) and quantization moved the logits.
    fp = ReferenceModel(tiny_model, _policy((16, 16), (16, 16)))
    assert (fp.forward(ids, fp.new_cache()) - expect).abs().max() > 100 * ATOL


def test_outliers_keep_the_largest_deviations_exactly():
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    x[0, 1, 5, 7] = 40.0  # a planted outlier, kept exactly
    codec = OutlierCodec(fraction=0.01)
    out = codec.keys(0, x, 3)
    exact = out == x.to(torch.float16).float()
    per_block = exact.flatten(-2).sum(-1)
    assert (per_block >= round(0.01 * 32 * 64)).all()
    assert exact[0, 1, 5, 7]
    # Without the outlier in their range the rest quantize finer than the uniform codec does.
    err = (out - x).abs()[0, 1].max()
    assert err < (qt.fake_quantize_keys(x, 3) - x).abs()[0, 1].max() / 3
    assert codec.extra_bits(64) == pytest.approx(0.32)


def test_outliers_at_fraction_zero_are_the_uniform_codec():
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(2))
    codec = OutlierCodec(fraction=0.0)
    assert torch.equal(codec.keys(0, x, 2), qt.fake_quantize_keys(x, 2))
    assert torch.equal(codec.values(0, x, 4, 32), qt.fake_quantize_values(x, 4, 32))


def test_outlier_values_are_per_token_groups():
    x = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(3))
    x[0, 3, 40] = -25.0
    out = OutlierCodec(fraction=0.005).values(0, x, 2, 32)
    assert out[0, 3, 40] == x[0, 3, 40].half().float()
    assert (out - x).abs().max() < (qt.fake_quantize_values(x, 2, 32) - x).abs().max()


def test_kmeans_levels_fit_the_data():
    g = torch.Generator().manual_seed(4)
    flat = torch.rand(100_000, generator=g)  # uniform data: the uniform grid is optimal
    assert torch.allclose(kmeans_levels(flat, 2), torch.linspace(0, 1, 4), atol=0.01)
    peaked = (torch.randn(100_000, generator=g) * 0.1 + 0.5).clamp(0, 1)
    levels = kmeans_levels(peaked, 2)
    assert torch.all(levels[1:] > levels[:-1]) and levels[0] == 0 and levels[-1] == 1
    grid = torch.linspace(0, 1, 4)

    def mse(lv):
        return float(((peaked[:, None] - lv).abs().min(-1).values ** 2).mean())
    assert mse(levels) < 0.5 * mse(grid)


def test_codebook_codec_lowers_the_error_it_was_fitted_on():
    # Lloyd's steps never raise the range-weighted squared error from the uniform grid it
    # starts at, so on its own calibration data the codebook is at least as good; on
    # Laplace-distributed groups (peaked, like real K/V) strictly better.
    torch.manual_seed(5)
    blocks = torch.distributions.Laplace(0.0, 1.0).sample((64, 32, 64))
    codec = CodebookCodec()
    codec.fit([blocks], [blocks.reshape(-1, 64)], 32, 32, (2, 3))
    for bits in (2, 3):
        ck = float(((codec.keys(0, blocks, bits) - blocks) ** 2).mean())
        uk = float(((qt.fake_quantize_keys(blocks, bits) - blocks) ** 2).mean())
        cv = float(((codec.values(0, blocks, bits, 32) - blocks) ** 2).mean())
        uv = float(((qt.fake_quantize_values(blocks, bits, 32) - blocks) ** 2).mean())
        assert ck < 0.97 * uk and cv < 0.97 * uv, (bits, ck, uk, cv, uv)


def test_codecs_are_registered():
    assert set(CODECS) == {"uniform", "outliers", "codebook"}


def test_heavy_hitters_with_an_all_recent_ring_is_the_sliding_window(tiny_model):
    policy = _policy(rotation="hadamard")
    ids = _ids(100, seed=6)
    window = method_model(tiny_model, policy)
    h2o = method_model(tiny_model, policy, cache_class=HeavyHitterCache, recent=1.0)
    a = window.forward(ids, window.new_cache())
    b = h2o.forward(ids, h2o.new_cache())
    assert (a - b).abs().max() < ATOL


def test_heavy_hitters_evict_the_least_attended_old_block(tiny_model):
    policy = _policy((16, 16), (16, 16), window=32)  # 4 ring slots
    ref = method_model(tiny_model, policy, cache_class=HeavyHitterCache, recent=0.5)
    cache = ref.new_cache()
    ref.forward(_ids(4 + 4 * 8, seed=7), cache)  # sinks + 4 blocks: the ring is full
    held = cache.slot_block[0]
    assert sorted(held.values()) == [0, 1, 2, 3]
    scores = cache.block_score[0]
    assert all(scores[b] > 0 for b in range(4))
    victim = min((0, 1), key=scores.get)  # blocks 2 and 3 are the recent half
    ref.forward(_ids(8, seed=8), cache)
    assert sorted(held.values()) == sorted({0, 1, 2, 3, 4} - {victim})
    assert len(cache.view(0)[0][0, 0]) == 4 + 4 * 8 + 0  # sinks + 4 blocks, empty residual


def test_divergence_is_zero_for_the_same_cache_and_matches_perplexity(tiny_model):
    from edgekv.quality.divergence import divergence
    from edgekv.quality.perplexity import perplexity

    ids = _ids(130, seed=9)[0].tolist()
    fp = ReferenceModel(tiny_model, _policy((16, 16), (16, 16)))
    same = divergence(fp, fp, ids, sequences=2, step=40)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.delta_pct == pytest.approx(0.0, abs=1e-9)
    q = ReferenceModel(tiny_model, _policy((2, 2), (2, 2)))
    d = divergence(fp, q, ids, sequences=2, step=40)
    assert d.kl > 1e-4
    assert d.ppl_test == pytest.approx(perplexity(q, ids, sequences=2).ppl, rel=1e-5)
    assert d.ppl_reference == pytest.approx(perplexity(fp, ids, sequences=2).ppl, rel=1e-5)
    # one block per (chunk, sequence), whose sums make up the delta
    assert d.block_tokens == [40, 40, 24, 24] and sum(d.block_tokens) == d.tokens_scored
    assert 100 * math.expm1(sum(d.block_delta_nll) / d.tokens_scored) == pytest.approx(d.delta_pct, rel=1e-5)
    assert d.delta_pct_se > 0 and same.delta_pct_se == 0.0


def test_salient_tokens_are_kept_exactly_and_chosen_by_attention(tiny_model):
    from edgekv.methods.salient import SalientTokenCache

    policy = _policy((2, 2), (2, 2), window=32)
    ref = method_model(tiny_model, policy, cache_class=SalientTokenCache, keep=2)
    cache = ref.new_cache()
    seen = []
    orig = cache._salient
    cache._salient = lambda layer, x: seen.append((layer, cache.mass[layer].clone(),
                                                   cache.viewers[layer].clone())) or orig(layer, x)
    ref.forward(_ids(4 + 8, seed=10), cache)  # sinks + one block: pushed once per layer
    assert len(seen) == 4  # keys and values of 2 layers
    layer, mass, count = seen[0]
    # Token j of the block is seen by the 8 - j queries at or after it, by all 4 heads.
    assert torch.equal(count, torch.tensor([8.0 - j for j in range(8)]) * 4)
    assert (mass > 0).all() and float(mass.sum()) < 8 * 4  # part of the mass went to the sinks
    top = (mass / count).topk(2).indices
    ring_k = cache.layers[layer]["ring_k"][0, :, 0]  # [H, B, D], un-rotated (no rotation here)
    exact = cache.layers[layer]["residual_k"][0].float()
    for j in range(8):
        assert torch.equal(ring_k[:, j], exact[:, j]) == (j in top.tolist())
    assert (cache.mass == 0).all()  # reset for the next block
