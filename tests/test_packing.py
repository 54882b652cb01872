import numpy as np
import pytest
import torch

from edgekv.packing import pack, packed_len, unpack
from edgekv.reference import quant_torch as qt

BITS = (1, 2, 3, 4, 5, 6, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 5, 40), (1, 7, 3, 64)])
def test_roundtrip_numpy_and_torch_bit_exact(bits, shape):
    rng = np.random.default_rng(bits * 100 + len(shape))
    codes = rng.integers(0, 1 << bits, size=shape, dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (*shape[:-1], packed_len(shape[-1], bits))
    np.testing.assert_array_equal(unpack(packed, bits, shape[-1]), codes)
    tpacked = qt.pack(torch.from_numpy(codes), bits)
    np.testing.assert_array_equal(tpacked.numpy(), packed)
    np.testing.assert_array_equal(qt.unpack(tpacked, bits, shape[-1]).numpy(), codes)


def test_layout_is_little_endian_bit_stream():
    # 3-bit codes 0..7: code i at bits [3i, 3i+3) of a little-endian stream.
    codes = np.arange(8, dtype=np.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == list(stream.to_bytes(3, "little"))
    assert pack(np.array([1, 2, 3, 0], np.uint8), 2).tolist() == [0b00111001]
    assert pack(np.array([0xA, 0x5], np.uint8), 4).tolist() == [0x5A]


@pytest.mark.parametrize("bits,n", [(3, 4), (2, 3), (5, 4), (7, 8)])
def test_bad_lengths_and_widths_are_refused(bits, n):
    with pytest.raises(ValueError):
        pack(np.zeros(n, np.uint8), bits)
