"""CPU schedules (llvm targets). Each returns the schedule, or None when it does not apply
(build.py then falls back to plain loops).

Attention on a CPU is a stream over the ring, block by block:
* scores: parallel over (KV head, ring slot); the slot's keys are unpacked and rotated
  into a B x D fp32 tile (L1-sized) shared by the slot's query heads, and the dot
  products run over the 8 token lanes of a unit as one vector;
* softmax passes over the scores (Hq x tokens fp32, not the cache), lanes vectorised;
* P.V: the ring is split into `PARTS` slot ranges (rfactor) so both heads and ranges
  run in parallel; each slot's values are unpacked into a B x D tile and accumulated
  into the query heads' outputs, channels as vector lanes.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import Schedule

from edgekv.policy import plain_rotated
from edgekv.tvm_kernels.params import AttnParams

PARTS = 8  # P.V ring partitions (load balance over cores when KV heads are few)


def pack(sch: Schedule) -> Schedule | None:
    """One block per layer every B tokens: plain loops are enough."""
    return None


def _scores(sch: Schedule, p: AttnParams) -> None:
    blk = sch.get_sblock("score_ring")
    i, j, k, m, t, lane, rh, re = sch.get_loops(blk)
    # register blocking: for each channel, every query head x token unit of the block
    # accumulates (R*C*B/8 vector accumulators), so a key vector is loaded once per head
    sch.reorder(i, m, rh, re, j, k, t, lane)
    par = sch.fuse(i, m)
    sch.parallel(par)
    stages = p.head_dim.bit_length() - 1 if p.rotate and p.bits_k != 16 else 0
    unrot = [f"kunrot{s}" for s in reversed(range(stages))]  # attention._unrotate's stages
    for name in ("krot", *unrot, "kdeq", "q_blk"):  # consumers before producers
        b = sch.get_sblock(name)
        sch.compute_at(b, par)
        sch.vectorize(sch.get_loops(b)[-1])
    sch.vectorize(lane)
    if p.rep * p.chunk * p.block // 8 <= 16:
        for loop in (j, k, t):
            sch.unroll(loop)
    sch.decompose_reduction(blk, rh)


def _softmax(sch: Schedule, p: AttnParams) -> None:
    for name in ("max_ring_part", "sum_ring_part"):
        blk = sch.get_sblock(name)
        i, j, k, lane, m, t = sch.get_loops(blk)
        sch.reorder(i, j, k, m, t, lane)
        sch.parallel(sch.fuse(i, j, k))
        sch.vectorize(lane)
        sch.decompose_reduction(blk, m)
    blk = sch.get_sblock("p_ring")
    i, j, k, m, t, lane = sch.get_loops(blk)
    sch.reorder(i, m, j, k, t, lane)
    sch.parallel(sch.fuse(i, m))
    sch.vectorize(lane)


def _values(sch: Schedule, p: AttnParams, sample: bool = False) -> None:
    blk = sch.get_sblock("pv_ring")
    i, j, k, x, lane, om, ot = sch.get_loops(blk)
    if sample:  # the MetaSchedule knob (tune.py): how many ring partitions P.V splits into
        parts = sch.sample_perfect_tile(om, n=2)[0]
    else:
        parts = PARTS if p.slots % PARTS == 0 else 1
    omo, omi = sch.split(om, [parts, None])
    rf = sch.rfactor(omo, 0)  # pv_ring_rf[omo, i, j, k, x, lane], same loops as pv_ring
    i2, j2, k2, x2, l2, po, omi2, ot2 = sch.get_loops(rf)
    # per token: one probability broadcast, D/8 value vectors into D/8 register accumulators
    sch.reorder(po, i2, omi2, j2, k2, ot2, x2, l2)
    if p.head_dim // 8 <= 16:
        sch.unroll(x2)
    par = sch.fuse(po, i2)
    sch.parallel(par)
    sch.compute_at(sch.get_sblock("vdeq"), omi2)
    vd = sch.get_sblock("vdeq")
    sch.vectorize(sch.get_loops(vd)[-1])
    sch.vectorize(l2)
    sch.decompose_reduction(rf, omi2)


def _plain_unrotation(sch: Schedule, p: AttnParams) -> None:
    """Residual "u8hr": the float64 butterfly that un-rotates the sinks and the residual
    (pack.plain_input) runs over all S + B tokens every call; its stages vectorised over
    channels, the dequantize-and-widen stage inlined into the first one."""
    if not plain_rotated(p.residual):
        return
    stages = p.head_dim.bit_length() - 1
    for part in ("sink", "residual") if p.sinks else ("residual",):
        for side in "k" if p.folds_plain_values else "kv":
            name = f"{part}_{side}"
            sch.compute_inline(sch.get_sblock(f"{name}_f64"))
            for stage in (*(f"{name}_unrot{k}" for k in range(stages)), f"{name}_unrot32"):
                blk = sch.get_sblock(stage)
                sch.vectorize(sch.get_loops(blk)[-1])


def attention(sch: Schedule, p: AttnParams, target: tvm.target.Target, sample: bool = False) -> Schedule | None:
    if target.kind.name != "llvm":
        return None
    _plain_unrotation(sch, p)
    _scores(sch, p)
    _softmax(sch, p)
    _values(sch, p, sample)
    return sch
