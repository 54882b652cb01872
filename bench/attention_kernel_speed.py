"""Decode attention over the compressed cache: the TVM kernel vs numpy and torch, same run.

One layer of SmolLM2-135M's geometry (9 query heads, 3 KV heads, head_dim 64), 4 sinks,
a full ring of N tokens (block 32, group 32), 16 residual tokens, one query. Rows per
context:
  tvm            the fused dequantize-attention kernel (tvm_kernels), compressed cache in
  numpy          the same attention in numpy fp32: dequantize, RoPE (fp32 cos/sin
                 tables), softmax, P.V, from the compressed cache every call
  torch deq+sdpa dequantize (edgekv.reference.quant_torch) + RoPE + SDPA every call
  torch fp32     SDPA (enable_gqa) over a cache dequantized and rotated beforehand: the
                 uncompressed fp32 baseline; ratios are against this row
GB/s = bytes of cache the row reads per call / time (compressed bytes for the first three
rows, fp32 K and V for the last). Times are the minimum of --reps calls after a warm-up.

usage: .venv/bin/python bench/attention_kernel_speed.py [--bits 3] [--contexts 1024 4096 16384 65536]
       [--threads 2] [--reps 7] [--out bench/results/kernels-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time


def _min_time(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="bench/results/kernels-cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    import numpy as np
    import torch
    import tvm

    from edgekv import quant
    from edgekv.reference import quant_torch as qt
    from edgekv.tvm_kernels.build import build_attention
    from edgekv.tvm_kernels.params import AttnParams
    from edgekv.tvm_kernels.rope import inv_freq
    from edgekv.tvm_kernels.targets import host_target

    torch.set_num_threads(args.threads)
    hq, h, d, s, b, g, bits = 9, 3, 64, 4, 32, 32, args.bits
    res = 16
    target = host_target(args.threads)
    freqs = inv_freq(d)
    rows = []
    for ctx in args.contexts:
        slots = ctx // b
        n = slots * b
        p = AttnParams(hq, h, d, s, slots, b, g, bits, bits, 1)
        t0 = time.perf_counter()
        lib = build_attention(p, target, device="cpu-x86_64")  # tuning records where they exist (1k)
        compile_s = time.perf_counter() - t0
        rng = np.random.default_rng(ctx)
        k16 = rng.standard_normal((1, h, n, d)).astype(np.float16)
        v16 = rng.standard_normal((1, h, n, d)).astype(np.float16)
        kq = quant.quantize_keys(k16.reshape(1, h, slots, b, d), bits)
        vq = quant.quantize_values(v16, bits, g)
        sink_k, sink_v = (rng.standard_normal((1, h, s, d)).astype(np.float16) for _ in range(2))
        res_k, res_v = (rng.standard_normal((1, h, b, d)).astype(np.float16) for _ in range(2))
        q = rng.standard_normal((1, hq, 1, d)).astype(np.float32)
        # cache positions: sinks 0..3, ring block m at 4 + 32m, residual after the ring
        total = s + n + res
        pos = np.arange(total)
        ang = pos[:, None] * freqs[None]
        cos32 = np.concatenate([np.cos(ang)] * 2, -1).astype(np.float32)  # [total, D]
        sin32 = np.concatenate([np.sin(ang)] * 2, -1).astype(np.float32)
        blk = (s + np.arange(slots + 1) * b)[:, None] * freqs[None]
        off = freqs[:, None] * np.arange(b)[None]
        tables = [np.cos(pos[:s, None] * freqs[None]), np.sin(pos[:s, None] * freqs[None]),
                  np.cos(blk), np.sin(blk), np.cos(off), np.sin(off)]
        tvm_args = [q, sink_k, sink_v, res_k, res_v, kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero,
                    *(t.astype(np.float32) for t in tables), np.array([s, slots, res], np.int32)]
        tvm_args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in tvm_args]
        out = tvm.runtime.empty((1, hq, 1, d), "float32")
        fn = lib["main"]

        def run_tvm():
            fn(*tvm_args, out)

        def rot_np(x, c, sn):
            half = x.shape[-1] // 2
            return x * c + np.concatenate([-x[..., half:], x[..., :half]], -1) * sn

        def run_numpy():
            kr = quant.dequantize_keys(kq, bits, b).reshape(1, h, n, d)
            vr = quant.dequantize_values(vq, bits, g, d)
            keys = np.concatenate([sink_k.astype(np.float32), kr, res_k[:, :, :res].astype(np.float32)], 2)
            vals = np.concatenate([sink_v.astype(np.float32), vr, res_v[:, :, :res].astype(np.float32)], 2)
            keys = rot_np(keys, cos32, sin32)
            qq = q.reshape(h, hq // h, d)
            sc = np.einsum("hrd,htd->hrt", qq, keys[0]) / np.float32(np.sqrt(d))
            e = np.exp(sc - sc.max(-1, keepdims=True))
            return np.einsum("hrt,htd->hrd", e / e.sum(-1, keepdims=True), vals[0])

        tq = torch.from_numpy(q)
        tcos, tsin = torch.from_numpy(cos32), torch.from_numpy(sin32)
        tk = [torch.from_numpy(x) for x in (kq.codes, kq.scale, kq.zero)]
        tv = [torch.from_numpy(x) for x in (vq.codes, vq.scale, vq.zero)]
        tsk, tsv = torch.from_numpy(sink_k).float(), torch.from_numpy(sink_v).float()
        trk, trv = torch.from_numpy(res_k[:, :, :res]).float(), torch.from_numpy(res_v[:, :, :res]).float()

        def rot_t(x):
            x1, x2 = x.chunk(2, -1)
            return x * tcos + torch.cat([-x2, x1], -1) * tsin

        def deq_torch():
            kr = qt.dequantize_keys(*tk, bits, b).reshape(1, h, n, d)
            vr = qt.dequantize_values(*tv, bits, g, d)
            return rot_t(torch.cat([tsk, kr, trk], 2)), torch.cat([tsv, vr, trv], 2)

        sdpa = torch.nn.functional.scaled_dot_product_attention
        with torch.inference_mode():
            kf, vf = deq_torch()
            kf, vf = kf.contiguous(), vf.contiguous()

            def run_torch_fp32():
                return sdpa(tq, kf, vf, enable_gqa=True)

            def run_torch_deq():
                k_, v_ = deq_torch()
                return sdpa(tq, k_, v_, enable_gqa=True)

            # agreement check (not timed): the kernel vs torch over the same cache
            run_tvm()
            err = float(np.abs(out.numpy() - run_torch_fp32().numpy()).max())
            reps_slow = max(2, args.reps // 3) if ctx >= 16384 else args.reps
            t_tvm = _min_time(run_tvm, args.reps)
            t_fp32 = _min_time(run_torch_fp32, args.reps)
            t_deq = _min_time(run_torch_deq, reps_slow)
            t_np = _min_time(run_numpy, reps_slow)
        comp = p.cache_bytes()  # the kernel scans the whole residual buffer (masked)
        fp32 = 2 * total * h * d * 4
        row = {"context": total, "bits": bits, "compile_s": round(compile_s, 2), "max_abs_err_vs_torch": err,
               "ms": {"tvm": t_tvm * 1e3, "numpy": t_np * 1e3, "torch_deq_sdpa": t_deq * 1e3, "torch_fp32_sdpa": t_fp32 * 1e3},
               "gbs": {"tvm": comp / t_tvm / 1e9, "numpy": comp / t_np / 1e9, "torch_deq_sdpa": comp / t_deq / 1e9,
                       "torch_fp32_sdpa": fp32 / t_fp32 / 1e9},
               "cache_bytes": {"compressed": comp, "fp32": fp32}}
        rows.append(row)
        print(f"ctx {total:6d}  tvm {t_tvm*1e3:8.3f} ms ({row['gbs']['tvm']:5.2f} GB/s)  "
              f"torch fp32 {t_fp32*1e3:8.3f} ms ({row['gbs']['torch_fp32_sdpa']:5.2f} GB/s)  "
              f"torch deq+sdpa {t_deq*1e3:8.3f} ms  numpy {t_np*1e3:8.3f} ms  "
              f"tvm/torch_fp32 {t_fp32/t_tvm:5.2f}x  err {err:.1e}", flush=True)
    result = {"device": _cpu_name(), "cores_used": args.threads, "target": str(target),
              "tvm": tvm.__version__, "torch": torch.__version__,
              "load_avg": os.getloadavg(), "shape": {"hq": hq, "hkv": h, "d": d, "sinks": s, "block": b, "group": g},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
