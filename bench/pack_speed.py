"""Time of packing one block on every cache unit (a layer, or each of its units where its
heads differ in width: what a decode step pays when the residual fills), per bundle, in
one process: the runtime's own pack path (OrtBackend.pack), random residual contents,
median of 20 rounds after 3 warm-up rounds; ratios against the first.

    .venv/bin/python bench/pack_speed.py BUNDLE [BUNDLE ...]
"""

import sys
import time

import numpy as np


def pack_ms(path: str) -> float:
    from edgekv.runtime import Engine

    eng = Engine.load(path, backend="ort")
    units = eng.bundle.policy.num_units
    rng = np.random.default_rng(0)
    for unit in range(units):
        for side in ("k", "v"):
            buf = eng.state.buffers[f"past.{unit}.residual_{side}"]
            buf[...] = rng.standard_normal(buf.shape)
    times = []
    for i in range(23):
        t0 = time.perf_counter()
        for unit in range(units):
            eng.backend.pack(unit)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    base = None
    for path in sys.argv[1:]:
        ms = pack_ms(path)
        base = base or ms
        print(f"{path}: {ms:.1f} ms per block on all units ({ms / base:.2f}x)")


if __name__ == "__main__":
    main()
