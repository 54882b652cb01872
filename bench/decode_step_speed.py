"""Time of one decode step per bundle on the onnxruntime backend (or `--backend ort+tvm`,
whose attention runs the bundle's compiled kernels), interleaved: each
bundle's Engine is loaded once (1 thread), then rounds of 10 decode steps alternate between
the bundles so that load on a shared machine hits all alike; the median of rounds 3-12 and
the ratio to the first bundle. The step's arithmetic does not depend on the cache
contents (every slot is computed, the mask only hides), so the cache stays as loaded.
Compare graphs by exporting the same model at two commits.

    .venv/bin/python bench/decode_step_speed.py [--backend ort+tvm] BUNDLE BUNDLE [...]
"""

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--backend", default="ort", choices=["ort", "ort+tvm"])
    args = ap.parse_args()
    from edgekv.runtime import Engine

    engines = {path: Engine.load(path, backend=args.backend, threads=1) for path in args.bundles}
    for eng in engines.values():
        eng.state.prepare(1)
    times: dict[str, list[float]] = {path: [] for path in engines}
    for _ in range(12):
        for path, eng in engines.items():
            t0 = time.perf_counter()
            for _ in range(10):
                eng.backend.run([1], 1)
            times[path].append((time.perf_counter() - t0) / 10)
    base = None
    for path, ts in times.items():
        ms = 1e3 * float(np.median(ts[2:]))
        base = base or ms
        print(f"{path}: {ms:.2f} ms per decode step ({ms / base:.2f}x)")


if __name__ == "__main__":
    main()
