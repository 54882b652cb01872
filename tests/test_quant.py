import numpy as np
import pytest
import torch

from edgekv import quant
from edgekv.reference import quant_torch as qt

BITS = (1, 2, 3, 4, 5, 6, 8)


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., 0] *= 20.0  # an outlier channel, as real keys have
    return x.astype(np.float16).astype(np.float32)  # cache inputs are fp16


@pytest.mark.parametrize("bits", BITS)
def test_keys_error_within_bound_and_torch_matches(bits):
    x = _data((2, 3, 32, 64), bits)  # [N, H, B, D]
    q = quant.quantize_keys(x, bits)
    assert q.codes.shape == (2, 3, 64, 32 * bits // 8) and q.scale.dtype == np.float16
    back = quant.dequantize_keys(q, bits, 32)
    bound = quant.error_bound(x.min(-2), x.max(-2), bits)[..., None, :]
    assert np.all(np.abs(back - x) <= bound)
    # Not trivially loose: the bound is within 2x of the worst error actually seen.
    assert np.max(np.abs(back - x) / bound) > 0.5
    codes, scale, zero = qt.quantize_keys(torch.from_numpy(x), bits)
    np.testing.assert_array_equal(codes.numpy(), q.codes)
    np.testing.assert_array_equal(scale.numpy(), q.scale)
    np.testing.assert_array_equal(zero.numpy(), q.zero)
    np.testing.assert_allclose(qt.dequantize_keys(codes, scale, zero, bits, 32).numpy(), back, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [8, 32, 64])
def test_values_error_within_bound_and_torch_matches(bits, group):
    x = _data((1, 3, 40, 64), bits + group)  # [N, H, T, D]
    q = quant.quantize_values(x, bits, group)
    assert q.codes.shape == (1, 3, 40, 64 * bits // 8) and q.scale.shape == (1, 3, 40, 64 // group)
    back = quant.dequantize_values(q, bits, group, 64)
    g = x.reshape(1, 3, 40, 64 // group, group)
    bound = np.repeat(quant.error_bound(g.min(-1), g.max(-1), bits), group, axis=-1)
    assert np.all(np.abs(back - x) <= bound)
    codes, scale, zero = qt.quantize_values(torch.from_numpy(x), bits, group)
    np.testing.assert_array_equal(codes.numpy(), q.codes)
    np.testing.assert_array_equal(scale.numpy(), q.scale)
    np.testing.assert_allclose(qt.dequantize_values(codes, scale, zero, bits, group, 64).numpy(), back,
                               rtol=0, atol=1e-6)


def test_constant_block_is_exact():
    x = np.full((32, 16), 0.75, np.float32)
    for bits in BITS:
        q = quant.quantize_keys(x, bits)
        np.testing.assert_array_equal(quant.dequantize_keys(q, bits, 32), x)


def test_more_bits_means_less_error():
    x = _data((4, 32, 64), 7)
    errs = [np.abs(quant.dequantize_keys(quant.quantize_keys(x, b), b, 32) - x).mean() for b in BITS]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("bits", BITS)
def test_u8_metadata_covers_every_group_and_torch_matches(bits):
    """8-bit scale/zero (edgekv.meta_u8): the decoded grid starts at or below each group's
    minimum (up to the fp16 rounding of the block's lo, as fp16 zeros round) and reaches its
    maximum, so every element is within half a decoded step; the step is at most one scale
    code (2.2 %) plus the zero's 1/255 of the minima's spread above the fp16-metadata step;
    numpy and torch store the same bytes."""
    from edgekv import meta_u8

    x = _data((2, 3, 32, 64), 10 + bits)
    q = quant.quantize_keys(x, bits, "u8")
    assert q.scale.dtype == q.zero.dtype == np.uint8 and q.meta.shape == (2, 3, 3)
    scale, zero = meta_u8.decode(q.scale, q.zero, q.meta, (-1,))
    mn, mx = x.min(-2), x.max(-2)
    lo_slack = 2.0**-11 * np.abs(mn).max(-1, keepdims=True)
    assert np.all(zero <= mn + lo_slack) and np.all(zero + ((1 << bits) - 1) * scale >= mx - 1e-6)
    back = quant.dequantize_keys(q, bits, 32)
    assert np.all(np.abs(back - x) <= scale[..., None, :] / 2 + lo_slack[..., None] + 1e-6)
    step16 = (mx - mn) / ((1 << bits) - 1)
    spread = mn.max(-1, keepdims=True) - mn.min(-1, keepdims=True)
    assert np.all(scale <= step16 * 2 ** (1 / 32) * (1 + 1e-3) + spread / 255 / ((1 << bits) - 1) * 1.01)
    t = qt.quantize_keys(torch.from_numpy(x), bits, "u8")
    for got, want in zip(t, q):
        np.testing.assert_array_equal(got.numpy(), want)
    v = quant.quantize_values(x, bits, 32, "u8")  # one block of 32 tokens per [n, h]
    assert v.meta.shape == (2, 3, 3)
    tv = qt.quantize_values(torch.from_numpy(x), bits, 32, "u8")
    for got, want in zip(tv, v):
        np.testing.assert_array_equal(got.numpy(), want)
    vs, _ = meta_u8.decode(v.scale, v.zero, v.meta, (-2, -1))
    err = np.abs(quant.dequantize_values(v, bits, 32, 64) - x)
    assert np.all(err <= np.repeat(vs, 32, axis=-1) / 2 + 2.0**-11 * np.abs(x).max() + 1e-6)
    fake = qt.fake_quantize_values(torch.from_numpy(x), bits, 32, "u8", 32).numpy()
    np.testing.assert_array_equal(fake, quant.dequantize_values(v, bits, 32, 64))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shared_meta_is_one_per_block_and_torch_matches(bits):
    """meta "u8s": the same 8-bit codes with one (lo, dz, top) per block for all KV heads
    (stored [..., 1, 3]): the grid still covers every group, numpy and torch store the same
    bytes, calibration's fake quantizers (heads on another axis) read back what is stored,
    and with a single KV head it is "u8" exactly."""
    from edgekv import meta_u8

    x = _data((2, 3, 32, 64), 20 + bits)
    q = quant.quantize_keys(x, bits, "u8s")
    assert q.meta.shape == (2, 1, 3)
    scale, zero = meta_u8.decode(q.scale, q.zero, q.meta, (-1,))
    mn, mx = x.min(-2), x.max(-2)
    lo_slack = 2.0**-11 * np.abs(mn).max((-2, -1), keepdims=True)
    assert np.all(zero <= mn + lo_slack) and np.all(zero + ((1 << bits) - 1) * scale >= mx - 1e-6)
    back = quant.dequantize_keys(q, bits, 32)
    assert np.all(np.abs(back - x) <= scale[..., None, :] / 2 + lo_slack[..., None] + 1e-6)
    for got, want in zip(qt.quantize_keys(torch.from_numpy(x), bits, "u8s"), q):
        np.testing.assert_array_equal(got.numpy(), want)
    v = quant.quantize_values(x, bits, 32, "u8s")
    assert v.meta.shape == (2, 1, 3)
    for got, want in zip(qt.quantize_values(torch.from_numpy(x), bits, 32, "u8s"), v):
        np.testing.assert_array_equal(got.numpy(), want)
    heads_first = torch.from_numpy(x).transpose(0, 1)  # calibration's [H, blocks, B, D]
    fake_k = qt.fake_quantize_keys(heads_first, bits, "u8s", heads=-4).transpose(0, 1).numpy()
    np.testing.assert_array_equal(fake_k, back)
    fake_v = qt.fake_quantize_values(heads_first.reshape(3, 64, 64), bits, 32, "u8s", 32)
    np.testing.assert_array_equal(fake_v.reshape(3, 2, 32, 64).transpose(0, 1).numpy(),
                                  quant.dequantize_values(v, bits, 32, 64))
    one = x[:, :1]
    for a, b in zip(quant.quantize_keys(one, bits, "u8s"), quant.quantize_keys(one, bits, "u8")):
        np.testing.assert_array_equal(a, b)


def test_u8_metadata_costs_little_against_fp16():
    """Mean squared error of 8-bit against fp16 metadata on outlier-channel keys: within 10 %."""
    x = _data((4, 3, 32, 64), 3)
    for bits in (2, 3, 4):
        e16 = np.mean((quant.dequantize_keys(quant.quantize_keys(x, bits), bits, 32) - x) ** 2)
        e8 = np.mean((quant.dequantize_keys(quant.quantize_keys(x, bits, "u8"), bits, 32) - x) ** 2)
        assert e16 < e8 < 1.10 * e16, (bits, e8 / e16)


@pytest.mark.parametrize("meta", ["fp16", "u8"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_clipped_range_clamps_the_extremes_and_torch_matches(bits, meta):
    """edgekv.clipping: the grid spans the middle `clip` of each group's range; what lies
    outside lands on the end codes; numpy and torch agree bit for bit."""
    clip = 0.85
    x = _data((2, 3, 32, 64), 40 + bits)
    q = quant.quantize_keys(x, bits, meta, clip)
    back = quant.dequantize_keys(q, bits, 32)
    mn, mx = x.min(-2), x.max(-2)
    t = (mx - mn) * np.float32((1 - clip) / 2)
    lo, hi = (mn + t)[..., None, :], (mx - t)[..., None, :]  # the narrowed range
    if meta == "fp16":  # u8 codes move the grid by their own steps (test_u8_metadata_*)
        bound = quant.error_bound(mn + t, mx - t, bits)[..., None, :]
        assert np.all(np.abs(back - np.clip(x, lo, hi)) <= bound)
    assert np.array_equal(quant.quantize_keys(x, bits, meta, 1.0).codes, quant.quantize_keys(x, bits, meta).codes)
    for got, expect in zip(qt.quantize_keys(torch.from_numpy(x), bits, meta, clip), q):
        np.testing.assert_array_equal(got.numpy(), expect)
    for got, expect in zip(qt.quantize_values(torch.from_numpy(x), bits, 32, meta, clip),
                           quant.quantize_values(x, bits, 32, meta, clip)):
        np.testing.assert_array_equal(got.numpy(), expect)


def test_clipping_lowers_the_error_of_gaussian_groups_at_2_bits():
    """Why edgekv.clipping exists: at 2 bits a min/max grid wastes its levels on the tails
    (the MSE-optimal range for 32 Gaussian samples is well inside [min, max])."""
    x = np.random.default_rng(5).standard_normal((64, 32, 64)).astype(np.float16).astype(np.float32)
    err = {c: float(np.mean((quant.dequantize_keys(quant.quantize_keys(x, 2, clip=c), 2, 32) - x) ** 2))
           for c in (1.0, 0.8)}
    assert err[0.8] < 0.9 * err[1.0]


def test_one_bit_wants_a_range_near_half_the_span_and_calibration_tries_it():
    """Why clipping.ONE_BIT_EXTRA exists: two levels on [min, max] of 32 Gaussian samples sit
    far in the tails; at about half the span they sit near +-0.8 sigma (the optimal 1-bit
    quantizer). Calibration tries those ratios at 1 bit only, and never with clipping off."""
    from edgekv import clipping

    x = np.random.default_rng(6).standard_normal((64, 32, 64)).astype(np.float16).astype(np.float32)
    err = {c: float(np.mean((quant.dequantize_keys(quant.quantize_keys(x, 1, clip=c), 1, 32) - x) ** 2))
           for c in (1.0, 0.8, 0.6, 0.5)}
    assert min(err[0.6], err[0.5]) < 0.75 * err[0.8] < 0.75 * err[1.0]
    assert set(clipping.ONE_BIT_EXTRA) <= set(clipping.for_width(clipping.CANDIDATES, 1))
    assert clipping.for_width(clipping.CANDIDATES, 2) == clipping.CANDIDATES
    assert clipping.for_width((1.0,), 1) == (1.0,) and clipping.for_width(clipping.CANDIDATES, 8) == (1.0,)
