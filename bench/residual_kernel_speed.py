"""What each sinks/residual format costs the TVM decode attention kernel on this CPU.

One layer of SmolLM2-135M's geometry (9 query heads, 3 KV heads, head_dim 64), 4 sinks,
W1024 (32 blocks of 32), 3-bit keys and values with Hadamard-rotated ring, meta u8s, one
query; the ring full and 16 residual tokens valid. Rows per `--residual` format, each the
minimum of --reps calls after a warm-up, with the ratio to the first format measured in the
same run (absolute times on a shared machine are noise; the ratios are the result). The
kernel's arithmetic does not depend on the values, so the buffers are zeros.

usage: .venv/bin/python bench/residual_kernel_speed.py [--residual u8 u8h u8hr fp16]
       [--threads 1] [--reps 200] [--out bench/results/residual-kernel-speed-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--residual", nargs="+", default=["u8", "u8h", "u8hr", "fp16"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/residual-kernel-speed-cpu.json")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import numpy as np
    import tvm

    from edgekv.tvm_kernels.attention import attention_te
    from edgekv.tvm_kernels.build import compile_module, scheduled_attention
    from edgekv.tvm_kernels.params import AttnParams
    from edgekv.tvm_kernels.targets import host_target

    target = host_target(args.threads)
    rows = []
    for residual in args.residual:
        p = AttnParams(9, 3, 64, 4, 32, 32, 32, 3, 3, 1, rotate=True, meta="u8s", residual=residual)
        lib = compile_module(tvm.IRModule({"main": scheduled_attention(p, target)}), target)
        bufs = []
        for t in attention_te(p):  # the kernel's arguments in order, output last
            a = np.zeros([int(x) for x in t.shape], dtype=str(t.dtype))
            if t.op.name == "counts":
                a[:] = [4, 32, 16]  # sinks, ring blocks, residual tokens
            bufs.append(tvm.runtime.tensor(a))
        fn = lib["main"]
        fn(*bufs)
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn(*bufs)
            best = min(best, time.perf_counter() - t0)
        rows.append(dict(residual=residual, us=best * 1e6))
    for r in rows:
        r["ratio"] = r["us"] / rows[0]["us"]
        print(f"{r['residual']:5} {r['us']:8.1f} us  x{r['ratio']:.2f} vs {rows[0]['residual']}")
    with open(args.out, "w") as f:
        json.dump(dict(threads=args.threads, reps=args.reps, rows=rows), f, indent=1)
    print(json.dumps({"wrote": args.out}))


if __name__ == "__main__":
    main()
