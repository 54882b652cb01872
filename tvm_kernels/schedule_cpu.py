"""CPU schedules (llvm targets). Each returns the schedule, or None when it does not apply
(then build.py falls back to plain loops)."""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from edgekv.tvm_kernels.params import AttnParams


def pack(sch: Schedule) -> Schedule | None:
    """One block per layer every B tokens: plain loops are enough."""
    return None


def attention(sch: Schedule, p: AttnParams, target: tvm.target.Target) -> Schedule | None:
    return None
