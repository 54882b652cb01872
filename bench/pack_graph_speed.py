"""Time of pack.onnx alone on every layer of the shipped SmolLM2 layouts, without an export:
the graph is built from each calibrated row of a results JSON (widths and value groups per
layer) with the default formats (Hadamard, --meta u8s, --residual u8hr, key feedback with
stand-in matrices: the cost does not depend on their values), fed random residual codes,
and run layer after layer on onnxruntime with one thread, binding the per-layer inputs the
graph declares. Median of 10 rounds over 30 layers after 3 warm-up rounds; each layout also
with fixed value groups (groups_v dropped). Run it at two commits to compare pack graphs;
`--formats u8:u8,u8s:u8hr` compares metadata:residual formats on the same layouts.

    .venv/bin/python bench/pack_graph_speed.py [RESULTS_JSON] [--formats META:RESIDUAL,...]
"""

import argparse

import json
import time

import numpy as np


def main() -> None:
    import onnxruntime as ort

    from edgekv.export.onnx_pack import build_pack
    from edgekv.key_feedback import KeyFeedback
    from edgekv.policy import CachePolicy, KVShape

    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="?", default="bench/results/value-groups-u8s-u8hr-18k-smollm2.json")
    ap.add_argument("--formats", default="u8s:u8hr", help="metadata:residual pairs, comma-separated")
    args = ap.parse_args()
    path = args.results
    formats = [tuple(f.split(":")) for f in args.formats.split(",")]
    rows = [r for r in json.loads(open(path).read())["rows"] if r["groups_v"]]
    shape = KVShape(num_layers=30, num_kv_heads=3, head_dim=64)
    fb = KeyFeedback(np.tile(np.eye(64, dtype=np.float32) * 0.01, (30, 3, 1, 1)))
    rng = np.random.default_rng(0)
    print("| layout | value groups | formats | pack graph inputs | ms per 30 layers |\n|---|---|---|---|---:|")
    for r in rows:
        for groups, (meta, residual) in ((g, f) for g in (tuple(r["groups_v"]), ()) for f in formats):
            p = CachePolicy(bits_k=tuple(r["bits_k"]), bits_v=tuple(r["bits_v"]), groups_v=groups,
                            rotation="hadamard", meta=meta, residual=residual, key_feedback=fb)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(build_pack(p, shape).SerializeToString(), opts)
            feeds = []
            for layer in range(30):
                per_layer = p.pack_variant(layer)
                f = {}
                for i in sess.get_inputs():
                    dims = [d if isinstance(d, int) else 1 for d in i.shape]
                    if i.name in per_layer:
                        f[i.name] = np.array([per_layer[i.name]], np.int64)
                    elif i.name == "f":
                        f[i.name] = fb.layer(layer)
                    elif i.type == "tensor(uint8)":
                        f[i.name] = rng.integers(0, 256, dims, dtype=np.uint8)
                    else:
                        f[i.name] = (rng.random(dims) * 0.01).astype(np.float16)
                feeds.append(f)
            times = []
            for i in range(13):
                t0 = time.perf_counter()
                for f in feeds:
                    sess.run(None, f)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            inputs = ", ".join(i.name for i in sess.get_inputs() if i.type == "tensor(int64)")
            print(f"| {r['setting'].split(' W')[0]} | {'calibrated' if groups else 'fixed'} | {meta}/{residual} | {inputs or '-'} "
                  f"| {1e3 * sorted(times)[len(times) // 2]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
