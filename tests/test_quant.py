import numpy as np
import pytest
import torch

from edgekv import quant
from edgekv.reference import quant_torch as qt

BITS = (2, 3, 4, 8)


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
