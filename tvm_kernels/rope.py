"""Host-side RoPE tables for the attention kernel (numpy only: the runtime may use it).

Every block of the cache holds consecutive positions (sinks 0..S-1, ring block p0..p0+B-1,
residual likewise), so the kernel needs cos/sin of each block's first position plus one
shared [D/2, B] table of in-block offsets, and rebuilds cos(p0 + t) by angle addition:
(N+1) x D/2 angles per step instead of a [tokens, D] table whose bytes would rival the
compressed cache's own. Angles are computed in float64 and rounded once to fp32.
"""

from __future__ import annotations

import numpy as np

from edgekv.policy import CachePolicy


def inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """Plain Llama RoPE frequencies (HF default rope_type)."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def _cs(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class RopeTables:
    """The kernel's constant tables (sinks, offsets) plus per-step block angles."""

    def __init__(self, policy: CachePolicy, freqs: np.ndarray, slots: int) -> None:
        self.policy, self.freqs, self.slots = policy, np.asarray(freqs, np.float64), slots
        s, b = policy.sinks, policy.block
        self.sink_cos, self.sink_sin = _cs(np.arange(s)[:, None] * self.freqs[None])
        self.off_cos, self.off_sin = _cs(self.freqs[:, None] * np.arange(b)[None])  # [D/2, B]
        self.blk_cos = np.zeros((slots + 1, len(self.freqs)), np.float32)
        self.blk_sin = np.zeros_like(self.blk_cos)

    def block_positions(self, n_sink: int, blocks_pushed: int) -> np.ndarray:
        """First position of every ring slot's block and (last) of the residual, with the
        rules of CacheState.prepare; unfilled slots get 0 (they are masked)."""
        p, b, slots = self.policy, self.policy.block, self.slots
        filled = min(blocks_pushed, slots)
        base = np.zeros(slots + 1, np.int64)
        blocks = np.arange(blocks_pushed - filled, blocks_pushed)  # oldest first
        if p.positions == "cache":
            base[blocks % slots] = n_sink + np.arange(filled) * b
            base[slots] = n_sink + filled * b
        else:
            base[blocks % slots] = p.sinks + blocks * b
            base[slots] = p.sinks + blocks_pushed * b
        return base

    def update(self, n_sink: int, blocks_pushed: int) -> None:
        c, s = _cs(self.block_positions(n_sink, blocks_pushed)[:, None] * self.freqs[None])
        self.blk_cos[...], self.blk_sin[...] = c, s


def rotate(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray) -> np.ndarray:
    """HF rotate-half RoPE of x [..., T, D] at `positions` [T], in fp32 out."""
    ang = np.asarray(positions, np.float64)[:, None] * np.asarray(freqs, np.float64)[None]
    cos, sin = np.cos(ang), np.sin(ang)
    cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rot * sin).astype(np.float32)
