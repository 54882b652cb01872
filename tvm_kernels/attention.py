"""Fused dequantize-attention (TE): C queries (C=1 decode, C>1 a causal prefill chunk)
against one layer's cache in storage order [sinks S | ring `slots` x B, b-bit | residual B].

Inputs (batch 1, the buffers exactly as CachePolicy.layer_tensors lists them):
  q [1,Hq,C,D] f32, already rotated (RoPE at its position), not yet scaled;
  sink_k, sink_v [1,H,S,D] f16; residual_k, residual_v [1,H,B,D] f16; with an 8-bit
  residual (p.residual "u8", "u8h", "u8hr") each is u8 codes followed by its _scale and
  _zero [1,H,T,D/G] f16 ([1,H,T,1] per head), dequantized in fp32 where fp16 is widened
  ("u8hr": then un-rotated in float64, hadamard_te) (pack.plain_input);
  ring keys: codes [1,H,N,D,B*bk/8] u8 + scale/zero [1,H,N,D] f16 (or ring_k [1,H,N,B,D] f16);
  ring values: codes [1,H,N*B,D*bv/8] u8 + scale/zero [1,H,N*B,D/Gv] f16 (Gv: p.group_v)
  (or ring_v f16);
  with 8-bit metadata (p.meta "u8") scale/zero are u8 codes and each side adds its
  per-block meta [1,H,N,3] f16 (edgekv.meta_u8; [1,1,N,3] shared by the heads with "u8s");
  RoPE tables (rope.py): sink_cos/sin [S,D/2]; blk_cos/sin [N+1,D/2], the angle of each
  ring block's first token and (row N) the residual's; off_cos/sin [D/2,B], the angle of
  offset t inside a block;
  counts [3] i32: valid sinks, valid ring slots (slots [0, n) are valid: the ring fills
  in order and, once full, every slot holds a block), residual tokens (the chunk's own
  tokens included; query c sees the first counts[2] - (C-1-c)).
Output: o [1,Hq,C,D] f32.

Keys are dequantized one block tile at a time, never as a whole fp32 cache. RoPE at
p0 + t is R(p0)R(t): the tile gets the in-block rotation R(t), the query R(p0)^T once per
block (docs/ARCHITECTURE.md, "TVM kernels"). Token axes are split (unit, lane of
8): 8 codes of b bits are b bytes, read as one little-endian word and unpacked by
constant shifts, so a vectorised lane loop needs no gathers. Softmax subtracts the max.
"""

from __future__ import annotations

import math

from tvm import te, tirx

from edgekv.meta_u8 import is_u8, meta_heads
from edgekv.tvm_kernels import hadamard_te
from edgekv.tvm_kernels.pack import plain_input
from edgekv.tvm_kernels.params import AttnParams

F32, F16, U8, I32, I64 = "float32", "float16", "uint8", "int32", "int64"


def _word(load, base, nbytes: int):
    """Little-endian word of `nbytes` consecutive bytes load(base + j). Signed, not
    unsigned: x86 before AVX-512 has no vector uint32->float conversion (the mask below
    makes an arithmetic shift harmless). int32 holds up to 4 bytes; the 5 and 6 bytes of
    8 five- or six-bit codes take int64."""
    dt = _word_dtype(nbytes)
    w = load(base).astype(dt)
    for j in range(1, nbytes):
        w = w | (load(base + j).astype(dt) << tirx.const(8 * j, dt))
    return w


def _word_dtype(nbytes: int) -> str:
    return I32 if nbytes <= 4 else I64


def _code(load, unit, lane, bits: int):
    """Code `unit*8 + lane` of a packed stream: 8 codes fill `bits` bytes."""
    if bits == 8:
        return load(unit * 8 + lane).astype(I32)
    dt = _word_dtype(bits)
    return (_word(load, unit * bits, bits) >> (lane * bits).astype(dt)) & tirx.const((1 << bits) - 1, dt)


def _exp(x):
    """exp for x <= 0 (scores minus their max) as Cephes' expf: n = round(x/ln2),
    a degree-7 polynomial of the remainder, 2^n by building the exponent bits. Plain
    arithmetic, so it vectorises (llvm calls scalar expf per lane otherwise); relative
    error ~1e-7."""
    x = tirx.max(x, tirx.const(-87.0, F32))  # exp(-87) ~ 1.6e-38: the smallest normal range
    n = tirx.floor(x * tirx.const(1.44269504088896341, F32) + tirx.const(0.5, F32))
    r = x - n * tirx.const(0.693359375, F32) - n * tirx.const(-2.12194440e-4, F32)
    y = tirx.const(1.9875691500e-4, F32)
    for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        y = y * r + tirx.const(c, F32)
    y = y * (r * r) + r + tirx.const(1.0, F32)
    bits = (n.astype(I32) + tirx.const(127, I32)) << tirx.const(23, I32)
    return y * tirx.reinterpret(F32, bits)


def attention_te(p: AttnParams, dense_rotation: bool = False) -> list[te.Tensor]:
    """dense_rotation: un-rotate by a D-wide reduction instead of butterfly stages (GPUs)."""
    hq, h, d, s, n, b, g, c = p.num_heads, p.num_kv_heads, p.head_dim, p.sinks, p.slots, p.block, p.group, p.chunk
    r, d2, u, w, gv = p.rep, p.head_dim // 2, p.block // 8, p.head_dim // 8, p.group_v
    bk, bv = p.bits_k, p.bits_v
    neg = tirx.const(-3.0e38, F32)  # finite: a fully masked stage never makes inf - inf
    zero32 = tirx.const(0.0, F32)

    q = te.placeholder((1, hq, c, d), F32, name="q")
    # sinks/residual: placeholders and fp32 loaders of element (head, token, channel)
    # (the un-rotation form: butterfly stages on CPUs, one D-wide reduction on GPUs, hadamard_te)
    unrotate = hadamard_te.dense if dense_rotation else hadamard_te.butterfly
    # "u8hr" values stay rotated, like a rotated ring's: P (V H) is summed with the ring's
    # and un-rotated once per query head, not once per token (keys must be un-rotated before RoPE)
    fold_values = p.folds_plain_values
    (sink_k, load_sk), (sink_v, load_sv), (res_k, load_rk), (res_v, load_rv) = (
        plain_input(f"{part}_{side}", (1, h, t, d), g, p.residual,
                    None if side == "v" and fold_values else unrotate)
        for part, t in (("sink", s), ("residual", b)) for side in "kv")
    u8 = is_u8(p.meta)
    hm = meta_heads(p.meta, h)
    md = U8 if u8 else F16
    if bk == 16:
        ring_k = [te.placeholder((1, h, n, b, d), F16, name="ring_k")]
    else:
        ring_k = [te.placeholder((1, h, n, d, b * bk // 8), U8, name="ring_k_codes"),
                  te.placeholder((1, h, n, d), md, name="ring_k_scale"),
                  te.placeholder((1, h, n, d), md, name="ring_k_zero")]
        if u8:
            ring_k.append(te.placeholder((1, hm, n, 3), F16, name="ring_k_meta"))
    if bv == 16:
        ring_v = [te.placeholder((1, h, n * b, d), F16, name="ring_v")]
    else:
        ring_v = [te.placeholder((1, h, n * b, d * bv // 8), U8, name="ring_v_codes"),
                  te.placeholder((1, h, n * b, d // gv), md, name="ring_v_scale"),
                  te.placeholder((1, h, n * b, d // gv), md, name="ring_v_zero")]
        if u8:
            ring_v.append(te.placeholder((1, hm, n, 3), F16, name="ring_v_meta"))

    def scale_zero(side, i, m, at):
        """(scale, zero) fp32 of group `at` of ring block m: fp16 as stored, or decoded from
        8-bit codes and the block's (lo, dz, top) (edgekv.meta_u8; exp2 instead of the
        table: within an ulp, which attention tolerates)."""
        sc, z = side[1][at], side[2][at]
        if not u8:
            return sc.astype(F32), z.astype(F32)
        meta = side[3]
        mi = 0 if hm == 1 else i  # "u8s": the block's heads share one meta
        top, lo, dz = (meta[0, mi, m, f].astype(F32) for f in (2, 0, 1))
        return (top * tirx.exp2(sc.astype(F32) * tirx.const(-1.0 / 32, F32)),
                lo + z.astype(F32) * dz)
    sink_cos = te.placeholder((s, d2), F32, name="sink_cos")
    sink_sin = te.placeholder((s, d2), F32, name="sink_sin")
    blk_cos = te.placeholder((n + 1, d2), F32, name="blk_cos")
    blk_sin = te.placeholder((n + 1, d2), F32, name="blk_sin")
    off_cos = te.placeholder((d2, b), F32, name="off_cos")
    off_sin = te.placeholder((d2, b), F32, name="off_sin")
    counts = te.placeholder((3,), I32, name="counts")

    qs = te.compute((h, r, c, d), lambda i, j, k, e: q[0, i * r + j, k, e] * tirx.const(1.0 / math.sqrt(d), F32), name="qs")

    # ---- ring keys: dequantize, rotate, score ------------------------------------------
    if bk == 16:
        kd = te.compute((h, n, 2, d2, u, 8), lambda i, m, hf, e, t, l: ring_k[0][0, i, m, t * 8 + l, hf * d2 + e].astype(F32), name="kdeq")
    else:
        codes = ring_k[0]

        def kdeq(i, m, hf, e, t, l):
            sc, z = scale_zero(ring_k, i, m, (0, i, m, hf * d2 + e))
            return _code(lambda x: codes[0, i, m, hf * d2 + e, x], t, l, bk).astype(F32) * sc + z

        kd = te.compute((h, n, 2, d2, u, 8), kdeq, name="kdeq")

    if p.rotate and bk != 16:
        # the key tile's channel is hf * D/2 + e: un-rotate it before RoPE (which does not
        # commute with H), in L1 with the tile (schedule_cpu computes the stages per block)
        kd = unrotate(kd, (h, n, 2, d2, u, 8), lambda i, m, hf, e, t, l: hf * d2 + e,
                      lambda v, c: (v[0], v[1], tirx.floordiv(c, d2), tirx.floormod(c, d2), v[4], v[5]), d, "kunrot")

    # RoPE at p0 + t is a rotation R(p0) R(t): keys get only the in-block R(t) (a constant
    # table), the query gets R(p0)^T once per block: 2 ops per key element instead of 6.
    def qrot(i, m, j, k, hf, e):
        a, b_ = qs[i, j, k, e], qs[i, j, k, d2 + e]
        cs, sn = blk_cos[m, e], blk_sin[m, e]
        return tirx.Select(hf == 0, a * cs + b_ * sn, b_ * cs - a * sn)

    qb = te.compute((h, n, r, c, 2, d2), qrot, name="q_blk")
    kr = te.compute((h, n, 2, d2, u, 8), lambda i, m, hf, e, t, l: kd[i, m, hf, e, t, l] * off_cos[e, t * 8 + l]
                    + tirx.Select(hf == 0, -kd[i, m, 1, e, t, l], kd[i, m, 0, e, t, l]) * off_sin[e, t * 8 + l], name="krot")
    rh, re_ = te.reduce_axis((0, 2), name="rh"), te.reduce_axis((0, d2), name="re")
    sr = te.compute((h, r, c, n, u, 8), lambda i, j, k, m, t, l: te.sum(
        qb[i, m, j, k, rh, re_] * kr[i, m, rh, re_, t, l], axis=[rh, re_]), name="score_ring")

    # ---- residual and sinks (fp16 or 8-bit, small) -----------------------------------------
    def plain_rot(load, i, tok, e, cs, sn):
        x = load(0, i, tok, e)
        other = load(0, i, tok, tirx.floormod(e + d2, d))
        return x * cs + tirx.Select(e < d2, -other, other) * sn

    def res_angle(tok, e):
        e2 = tirx.floormod(e, d2)
        bc, bs, oc, os_ = blk_cos[n, e2], blk_sin[n, e2], off_cos[e2, tok], off_sin[e2, tok]
        return bc * oc - bs * os_, bs * oc + bc * os_

    ker = te.compute((h, b, d), lambda i, tok, e: plain_rot(load_rk, i, tok, e, *res_angle(tok, e)), name="krot_res")
    ee = te.reduce_axis((0, d), name="ee")
    se = te.compute((h, r, c, b), lambda i, j, k, tok: te.sum(qs[i, j, k, ee] * ker[i, tok, ee], axis=ee), name="score_res")
    if s:
        ks = te.compute((h, s, d), lambda i, tok, e: plain_rot(load_sk, i, tok, e, sink_cos[tok, tirx.floormod(e, d2)],
                                                              sink_sin[tok, tirx.floormod(e, d2)]), name="krot_sink")
        es = te.reduce_axis((0, d), name="es")
        ss = te.compute((h, r, c, s), lambda i, j, k, tok: te.sum(qs[i, j, k, es] * ks[i, tok, es], axis=es), name="score_sink")

    # ---- masked, max-subtracted softmax -----------------------------------------------------
    def ring_ok(m):
        return m < counts[1]

    def res_ok(k, tok):
        return tok < counts[2] - (c - 1 - k)

    def sink_ok(tok):
        return tok < counts[0]

    am, at = te.reduce_axis((0, n), name="am"), te.reduce_axis((0, u), name="at")
    mr_part = te.compute((h, r, c, 8), lambda i, j, k, l: te.max(
        tirx.Select(ring_ok(am), sr[i, j, k, am, at, l], neg), axis=[am, at]), name="max_ring_part")
    al, ar = te.reduce_axis((0, 8), name="al"), te.reduce_axis((0, b), name="ar")
    parts = [te.compute((h, r, c), lambda i, j, k: te.max(mr_part[i, j, k, al], axis=al), name="max_ring"),
             te.compute((h, r, c), lambda i, j, k: te.max(tirx.Select(res_ok(k, ar), se[i, j, k, ar], neg), axis=ar), name="max_res")]
    if s:
        asn = te.reduce_axis((0, s), name="asn")
        parts.append(te.compute((h, r, c), lambda i, j, k: te.max(tirx.Select(sink_ok(asn), ss[i, j, k, asn], neg), axis=asn), name="max_sink"))

    def _max(i, j, k):
        v = parts[0][i, j, k]
        for t in parts[1:]:
            v = tirx.max(v, t[i, j, k])
        return v

    mx = te.compute((h, r, c), _max, name="max")
    er = te.compute((h, r, c, n, u, 8), lambda i, j, k, m, t, l: tirx.Select(
        ring_ok(m), _exp(sr[i, j, k, m, t, l] - mx[i, j, k]), zero32), name="p_ring")
    ep = te.compute((h, r, c, b), lambda i, j, k, tok: tirx.Select(
        res_ok(k, tok), _exp(se[i, j, k, tok] - mx[i, j, k]), zero32), name="p_res")
    sm, st = te.reduce_axis((0, n), name="sm"), te.reduce_axis((0, u), name="st")
    lr_part = te.compute((h, r, c, 8), lambda i, j, k, l: te.sum(er[i, j, k, sm, st, l], axis=[sm, st]), name="sum_ring_part")
    sl, sres = te.reduce_axis((0, 8), name="sl"), te.reduce_axis((0, b), name="sres")
    sums = [te.compute((h, r, c), lambda i, j, k: te.sum(lr_part[i, j, k, sl], axis=sl), name="sum_ring"),
            te.compute((h, r, c), lambda i, j, k: te.sum(ep[i, j, k, sres], axis=sres), name="sum_res")]
    if s:
        es_ = te.compute((h, r, c, s), lambda i, j, k, tok: tirx.Select(
            sink_ok(tok), _exp(ss[i, j, k, tok] - mx[i, j, k]), zero32), name="p_sink")
        ssn = te.reduce_axis((0, s), name="ssn")
        sums.append(te.compute((h, r, c), lambda i, j, k: te.sum(es_[i, j, k, ssn], axis=ssn), name="sum_sink"))

    def _sum(i, j, k):
        v = sums[0][i, j, k]
        for t in sums[1:]:
            v = v + t[i, j, k]
        return v

    denom = te.compute((h, r, c), _sum, name="denom")

    # ---- P.V: ring values dequantized one block tile at a time -----------------------------
    if bv == 16:
        vd = te.compute((h, n, b, w, 8), lambda i, m, tok, x, l: ring_v[0][0, i, m * b + tok, x * 8 + l].astype(F32), name="vdeq")
    else:
        vcodes = ring_v[0]
        gu = gv // 8  # units of 8 channels per group: the group index is the unit's, not the lane's

        def vdeq(i, m, tok, x, l):
            sc, z = scale_zero(ring_v, i, m, (0, i, m * b + tok, x // gu))
            return _code(lambda y: vcodes[0, i, m * b + tok, y], x, l, bv).astype(F32) * sc + z

        vd = te.compute((h, n, b, w, 8), vdeq, name="vdeq")
    om, ot = te.reduce_axis((0, n), name="om"), te.reduce_axis((0, b), name="ot")
    orr = te.compute((h, r, c, w, 8), lambda i, j, k, x, l: te.sum(
        er[i, j, k, om, ot // 8, ot % 8] * vd[i, om, ot, x, l], axis=[om, ot]), name="pv_ring")
    oe = te.reduce_axis((0, b), name="oe")
    ore = te.compute((h, r, c, d), lambda i, j, k, e: te.sum(ep[i, j, k, oe] * load_rv(0, i, oe, e), axis=oe), name="pv_res")
    if s:
        osn = te.reduce_axis((0, s), name="osn")
        ors = te.compute((h, r, c, d), lambda i, j, k, e: te.sum(es_[i, j, k, osn] * load_sv(0, i, osn, e), axis=osn), name="pv_sink")

    def _plain(i, j, k, e):  # the sinks' and the residual's P.V
        return ore[i, j, k, e] + ors[i, j, k, e] if s else ore[i, j, k, e]

    if p.rotate and bv != 16:
        # ring values are V H: their weighted sum is (P V) H, un-rotated once per query head
        def rotated_sum(i, j, k, e):
            v = orr[i, j, k, e // 8, e % 8]
            return v + _plain(i, j, k, e) if fold_values else v
        ring_out = unrotate(te.compute((h, r, c, d), rotated_sum, name="pv_ring_rot"),
                            (h, r, c, d), lambda i, j, k, e: e, lambda v, ch: (v[0], v[1], v[2], ch), d, "vunrot")

    def _out(z, qh, k, e):
        i, j = qh // r, qh % r
        if fold_values:
            return ring_out[i, j, k, e] / denom[i, j, k]
        ring = ring_out[i, j, k, e] if p.rotate and bv != 16 else orr[i, j, k, e // 8, e % 8]
        v = ring + ore[i, j, k, e]  # this order keeps the TIR, and so the tuning records, as they were
        if s:
            v = v + ors[i, j, k, e]
        return v / denom[i, j, k]

    out = te.compute((1, hq, c, d), _out, name="o")
    return [q, *sink_k, *sink_v, *res_k, *res_v, *ring_k, *ring_v,
            sink_cos, sink_sin, blk_cos, blk_sin, off_cos, off_sin, counts, out]


def attention_func(p: AttnParams, dense_rotation: bool = False):
    """The PrimFunc; argument order is `attention_te`'s (q, p.cache_names..., tables, counts, o)."""
    return te.create_prim_func(attention_te(p, dense_rotation)).with_attr("global_symbol", f"attn_{p.key}")
