"""Calibrated range clipping (policy.clip): quantize a group over a narrower range than
its [min, max].

A min/max grid spends its few levels on the group's extremes; at 2-3 bits most elements
then round coarsely so that one outlier fits. Shrinking the range symmetrically to a
fraction `ratio` of its span clamps the extremes to the end codes and gives every other
element a finer step. Which ratio pays is measured per side (K/V) and code width on
calibration text (edgekv.calibration), never assumed. It changes only how scale and zero
are chosen: the stored format, dequantization and every reader stay as they are.

Every backend repeats the same fp32 steps, so codes stay bit-exact across them:
    t = (max - min) * f32((1 - ratio) / 2);  min' = min + t;  max' = max - t
A ratio of 1 skips them (the plain min/max grid, bit for bit).
"""

from __future__ import annotations

import numpy as np

CANDIDATES = (1.0, 0.975, 0.95, 0.925, 0.9, 0.85, 0.8)  # ratios calibration tries below 8 bits
# Two levels want a far narrower range: on SmolLM2 the predicted loss is least at 0.6 for
# keys and 0.5 for values, and 2x-5x higher at 0.8-1 (BENCHMARKS.md).
ONE_BIT_EXTRA = (0.7, 0.6, 0.5)
SIDES = ("k", "v")


def for_width(clips: tuple[float, ...], bits: int) -> tuple[float, ...]:
    """The ratios calibration tries at `bits`, given its candidates `clips`: none below 1
    at 8 bits (nothing to win), ONE_BIT_EXTRA too at 1 bit unless clipping is off."""
    if bits >= 8:
        return (1.0,)
    if bits == 1 and tuple(clips) != (1.0,):
        return tuple(dict.fromkeys((*clips, *ONE_BIT_EXTRA)))
    return tuple(clips)


def candidates(calibrated: bool) -> tuple[float, ...]:
    """Ratios for calibration to try: all of CANDIDATES, or ratio 1 only (`--clip none`)."""
    return CANDIDATES if calibrated else (1.0,)


def shrink(ratio: float) -> float:
    """The fp32 constant (1 - ratio) / 2, as a Python float that is exactly an fp32 value."""
    return float(np.float32((1.0 - ratio) / 2.0))


def clipped_range(mn, mx, ratio: float):
    """[mn, mx] narrowed to `ratio` of its span around its middle (numpy or torch fp32)."""
    if ratio == 1.0:
        return mn, mx
    t = (mx - mn) * shrink(ratio)
    return mn + t, mx - t
