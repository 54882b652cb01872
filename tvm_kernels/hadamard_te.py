"""Multiplying by the orthonormal Sylvester-Hadamard matrix H along one channel index (TE).

H is symmetric and its own inverse, so the same product rotates and un-rotates. Two forms
of one product: `butterfly` (log2(D) radix-2 stages, D log D adds; the CPU kernels) and
`dense` (one D-wide reduction with the sign (-1)^popcount(c & j) taken from the indices;
GPU targets, whose dlight rules inline every spatial stage and never finish simplifying
the inlined butterflies; a reduction is not inlined). `dtype` is the arithmetic type:
float32 for the ring, float64 for the "u8hr" sinks/residual, whose codes must match the
reference's float64 product. The 1/sqrt(D) is edgekv.rotation's float32 entry in both.

`x` is a tensor, `idx(*v)` reads the channel index from a stage's loop variables and
`set_idx(v, c)` builds the loop variables with channel c instead.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import te, tirx


def _amplitude(d: int) -> float:
    return float(np.float32(1.0 / math.sqrt(d)))


def _stage(x, shape, idx, set_idx, bit: int, scale: float | None, name: str, dtype: str):
    """(a, b) -> (a + b, a - b) for the channel pairs that differ in `bit`."""
    def f(*v):
        c = idx(*v)
        lo = tirx.floordiv(c, 2 * bit) * (2 * bit) + tirx.floormod(c, bit)
        a, b = x[set_idx(v, lo)], x[set_idx(v, lo + bit)]
        y = tirx.Select(tirx.floormod(tirx.floordiv(c, bit), 2) == 0, a + b, a - b)
        return y * tirx.const(scale, dtype) if scale is not None else y
    return te.compute(shape, f, name=name)


def butterfly(x, shape, idx, set_idx, d: int, name: str, dtype: str = "float32"):
    """x @ H as log2(D) stages named name0, name1, ...; the scale goes on the last."""
    bit, stage = 1, 0
    while bit < d:
        last = bit * 2 == d
        x = _stage(x, shape, idx, set_idx, bit, _amplitude(d) if last else None, f"{name}{stage}", dtype)
        bit, stage = bit * 2, stage + 1
    return x


def dense(x, shape, idx, set_idx, d: int, name: str, dtype: str = "float32"):
    """x @ H as one reduction over the D channels (stage `name`)."""
    j = te.reduce_axis((0, d), name=f"{name}_j")
    bits = d.bit_length() - 1
    amp = _amplitude(d)

    def f(*v):
        both = tirx.bitwise_and(idx(*v), j)
        parity = sum(tirx.bitwise_and(tirx.shift_right(both, k), 1) for k in range(bits))
        h = tirx.Select(tirx.floormod(parity, 2) == 0, tirx.const(amp, dtype), tirx.const(-amp, dtype))
        return te.sum(x[set_idx(v, j)] * h, axis=j)
    return te.compute(shape, f, name=name)
