"""Prepare the `--baseline onnx` model for bench/profile_smollm2.sh: SmolLM2 (or MODEL)
as a standard past-key-values ONNX export (edgekv.export.baseline_onnx: torch.onnx.export
of the transformers model, because optimum cannot be installed beside our transformers).

usage: .venv/bin/python bench/export_onnx_baseline.py [MODEL] [-o bench/onnx-baseline]
"""

import argparse
import time

from edgekv.export.baseline_onnx import export_past_kv
from edgekv.export.model_loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("-o", "--output", default="bench/onnx-baseline")
    args = ap.parse_args()
    t0 = time.perf_counter()
    path = export_past_kv(load_model(args.model).model, args.output)
    print(f"exported {args.model} -> {path} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
