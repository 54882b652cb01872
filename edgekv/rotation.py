"""Hadamard rotation of K/V along head_dim before quantizing (QuaRot / llama.cpp style).

An orthonormal Hadamard matrix spreads an outlier channel over all channels, so min/max
groups get a narrower range. For values it is free at attention time (rotate the stored
values; un-rotate the attention output once, since P @ (V H) = (P @ V) H). For keys it is
not: keys are stored pre-RoPE and RoPE does not commute with H, so dequantized keys must
be un-rotated before RoPE (a D x D matmul per cached token in the ONNX graphs, log2(D)
butterfly stages in the TVM kernels). Part of the bundle format (policy.rotation);
measured in BENCHMARKS.md.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def hadamard(n: int) -> np.ndarray:
    """Orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): H @ H.T = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


@lru_cache(maxsize=None)
def _hadamard64(n: int) -> np.ndarray:
    h = hadamard(n).astype(np.float64)  # the float32 entries, exactly
    h.flags.writeable = False  # shared by every caller
    return h


def rotate_exact(x: np.ndarray) -> np.ndarray:
    """x @ H along the last axis, multiplied in float64 and rounded to float32: how every
    backend rotates and un-rotates residual "u8hr" sinks/residual (H is symmetric, so one
    product does both; the float64 sums are exact, so the result does not depend on x's shape)."""
    return (np.asarray(x).astype(np.float64) @ _hadamard64(x.shape[-1])).astype(np.float32)
