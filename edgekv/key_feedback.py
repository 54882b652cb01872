"""Query-aware rounding of keys (policy.key_feedback): GPTQ's error feedback, applied to
each cached key vector instead of a weight row.

A key's quantization error e (pre-RoPE, in the quantized, possibly rotated basis) moves
a logit by u.e, u the query seen through RoPE at the distance between them. Rounding
every channel to its nearest code minimizes |e|^2; what attention pays is e^T M e, with
M = E[u u^T] over calibration queries and distances (edgekv.calibration.key_weights).
Error feedback rounds the channels in order, STEP at a time, and folds each step's error
into the channels still to come (the optimal correction under M), so the error lands in
directions that queries do not read. Measured on SmolLM2 (BENCHMARKS.md "Query-aware
rounding"): about a third of the M-weighted error of round-to-nearest at 2 and 3 bits.

Only the choice of codes changes: scale and zero are the block's usual (clipped) grid, the
stored format, dequantization, the attention kernels and their readers stay as they are.
What the pack needs is one [H, D, D] "step matrix" per layer (`step_matrices`), stored in
the bundle as key_feedback.npy and fed to pack.onnx per layer. Values keep nearest
rounding: their weight (o_proj's columns) is nearly isotropic after the Hadamard rotation
and feedback bought 5 % there.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

STEP = 4  # channels rounded together; 1 gains 7 % more at 4x the sequential steps (BENCHMARKS.md)
DAMP = 0.01  # ridge on M (x mean diagonal), as GPTQ: keeps the inverse well conditioned
FILE = "key_feedback.npy"


class KeyFeedback:
    """Step matrices [L, H, D, D] float32; equal when their contents are (policies hash it)."""

    def __init__(self, matrices: np.ndarray) -> None:
        m = np.ascontiguousarray(matrices, dtype=np.float32)
        if m.ndim != 4 or m.shape[-1] != m.shape[-2] or m.shape[-1] % STEP:
            raise ValueError(f"key feedback matrices must be [layers, heads, D, D] with D a multiple "
                             f"of {STEP}, got {list(m.shape)}")
        if not np.isfinite(m).all():
            raise ValueError("key feedback matrices hold non-finite numbers")
        m.setflags(write=False)
        self.matrices = m
        self.digest = hashlib.sha256(m.tobytes()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyFeedback) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"KeyFeedback({list(self.matrices.shape)}, {self.digest})"

    def layer(self, i: int) -> np.ndarray:
        return self.matrices[i]

    def save(self, directory: Path) -> None:
        np.save(Path(directory) / FILE, self.matrices)

    @classmethod
    def load(cls, directory: Path) -> "KeyFeedback":
        path = Path(directory) / FILE
        try:
            return cls(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e


def step_matrices(weights: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """SPD weights M [..., D, D] -> step matrices F [..., D, D]: for the step over channels
    a:b, rows a:b hold U_SS^-1 U_SR on the channels after b (zero elsewhere), U the upper
    Cholesky factor of M^-1. Subtracting (x_S - q_S) @ F[a:b] from the row is GPTQ's update."""
    m = np.asarray(weights, dtype=np.float64)
    d = m.shape[-1]
    m = m + damp * np.trace(m, axis1=-2, axis2=-1)[..., None, None] / d * np.eye(d)
    u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(m)), -1, -2)  # M^-1 = U^T U
    f = np.zeros_like(m)
    for a in range(0, d, STEP):
        b = a + STEP
        f[..., a:b, b:] = np.linalg.solve(u[..., a:b, a:b], u[..., a:b, b:])
    return f.astype(np.float32)


def round_with_feedback(x, scale, zero, f, codes_fn):
    """Codes of x [..., B, D] on the per-channel grid (scale, zero [..., 1, D] float32),
    STEP channels at a time, each step's error fed forward through f (broadcastable to
    [..., D, D]). numpy or torch: `codes_fn(x, scale, zero)` is the backend's nearest
    rounding. Returns the list of per-step codes [..., B, STEP] (the caller concatenates)."""
    out = []
    for a in range(0, x.shape[-1], STEP):
        b = a + STEP
        s, z = scale[..., a:b], zero[..., a:b]
        q = codes_fn(x[..., a:b], s, z)
        if b < x.shape[-1]:
            x = x - (x[..., a:b] - (q * s + z)) @ f[..., a:b, :]
        out.append(q)
    return out
