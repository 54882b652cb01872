"""Bit packing of b-bit codes, numpy reference (DESIGN.md "Packing").

Codes form a little-endian bit stream along the last axis: code i occupies
bits [i*b, (i+1)*b) of the stream, and stream bit j is bit (j % 8) of byte j // 8.
That is exactly numpy's packbits/unpackbits with bitorder="little".
"""

from __future__ import annotations

import numpy as np

PACKED_BITS = (1, 2, 3, 4, 5, 6, 8)


def packed_len(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits occupy; n * bits must fill whole bytes."""
    if bits not in PACKED_BITS:
        raise ValueError(f"packing supports bits {PACKED_BITS}, got {bits}")
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not end on a byte boundary")
    return n * bits // 8


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (< 2**bits) along the last axis into uint8 bytes."""
    codes = np.asarray(codes, dtype=np.uint8)
    n = codes.shape[-1]
    nbytes = packed_len(n, bits)
    if bits == 8:
        return codes.copy()
    # [..., n, 8] little-endian bits of each code; keep the low `bits` of them.
    code_bits = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = code_bits.reshape(*codes.shape[:-1], n * bits)
    out = np.packbits(stream, axis=-1, bitorder="little")
    assert out.shape[-1] == nbytes
    return out


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack`: n uint8 codes per row from the packed last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != packed_len(n, bits):
        raise ValueError(f"expected {packed_len(n, bits)} bytes for {n} codes, got {packed.shape[-1]}")
    if bits == 8:
        return packed.copy()
    stream = np.unpackbits(packed, axis=-1, bitorder="little")
    code_bits = stream.reshape(*packed.shape[:-1], n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    return (code_bits * weights).sum(axis=-1, dtype=np.uint16).astype(np.uint8)
