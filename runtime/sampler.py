"""Next-token choice from one logits vector: greedy, or temperature with top-k / top-p.

Seeded sampling draws from one numpy Generator per generation, so the same seed, prompt
and bundle give the same tokens. Greedy (temperature 0) is a plain argmax, which is what
the reference comparison tests use.
"""

from __future__ import annotations

import numpy as np

from edgekv.errors import EdgekvError


class SamplingError(EdgekvError, ValueError):
    """Invalid sampling parameters."""


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> None:
        if temperature < 0:
            raise SamplingError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def __call__(self, logits: np.ndarray) -> int:
        if self.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x[x < kth] = -np.inf
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            keep = order[:int(np.searchsorted(cum, self.top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        cdf = np.cumsum(p)
        return int(min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), p.size - 1))
