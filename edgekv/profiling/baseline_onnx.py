"""`--baseline onnx DIR`: a standard decoder ONNX export with a growing past-key-values
cache (the layout of optimum's exporter and onnxruntime-genai's builder) run on
onnxruntime: what an ONNX user would pick instead of edgekv.

Inputs: input_ids, attention_mask, position_ids (optional), past_key_values.{i}.key /
.value [1, kv_heads, past, head_dim]; outputs: logits and present.{i}.key / .value, fed
back as the next step's past (the cache grows by one token per step, copied each step).
Greedy, one forward over the prompt, then one per new token. Torch-free.

    python -m edgekv.profiling.baseline_onnx SPEC.json   (worker; see runner.py)
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np

from edgekv.errors import EdgekvError
from edgekv.runtime.profiler import Progress, measure, timed_stream, worker_main

_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def find_model(path: str | Path) -> Path:
    """DIR/model.onnx (or the .onnx file itself)."""
    p = Path(path)
    f = p if p.suffix == ".onnx" else p / "model.onnx"
    if not f.is_file():
        raise EdgekvError(f"--baseline onnx: {f} does not exist (expected a decoder export with "
                          f"past_key_values inputs, e.g. bench/export_onnx_baseline.py)")
    return f


def job(spec: dict, progress: Progress) -> dict:
    import onnxruntime as ort

    from edgekv.runtime.engine import peak_rss
    from edgekv.runtime.profiler import reset_peak_rss

    t0 = time.perf_counter()
    reset_peak_rss()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(spec.get("threads") or 0)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(find_model(spec["model"])), so, providers=["CPUExecutionProvider"])
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    inputs = {i.name: i for i in sess.get_inputs()}
    past = [n for n in inputs if n.startswith("past_key_values.")]
    if "input_ids" not in inputs or not past:
        raise EdgekvError(f"{spec['model']} has no input_ids / past_key_values.* inputs: not a "
                          f"past-key-values decoder export")
    outputs = [o.name for o in sess.get_outputs()]
    present = {n: n.replace("past_key_values.", "present.") for n in past}
    missing = [p for p in present.values() if p not in outputs]
    if missing:
        raise EdgekvError(f"{spec['model']} has no output {missing[0]} for its past input")
    last: dict = {}

    def empty(name: str) -> np.ndarray:
        shape = inputs[name].shape  # [batch, heads, past, head_dim]
        return np.zeros((1, int(shape[1]), 0, int(shape[3])), _DTYPES[inputs[name].type])

    def step(ids: list[int], cache: dict, pos: int) -> tuple[np.ndarray, dict]:
        feed = {"input_ids": np.array([ids], np.int64), **cache}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((1, pos + len(ids)), np.int64)
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(pos, pos + len(ids), dtype=np.int64)[None]
        out = dict(zip(outputs, sess.run(outputs, feed)))
        return out["logits"][0, -1], {n: out[present[n]] for n in past}

    def run_once(ids: Sequence[int], gen: int, prog: Progress | None):
        def stream():
            cache = {n: empty(n) for n in past}
            logits, cache = step(list(ids), cache, 0)
            if prog:
                prog(len(ids))
            pos = len(ids)
            for i in range(gen):
                tok = int(np.argmax(logits))
                yield tok
                if i < gen - 1:
                    logits, cache = step([tok], cache, pos)
                    pos += 1
            last["cache"] = cache
        return timed_stream(stream(), prog)

    prompts = {int(k): v for k, v in spec["prompts"].items()}
    rows = measure(run_once, prompts, spec["gen"], spec.get("repeat", 1), spec.get("warmup", 1),
                   lambda: sum(a.nbytes for a in last.get("cache", {}).values()), progress)
    return {"load_s": load_s, "load_peak_rss_bytes": load_peak, "model": str(spec["model"]),
            "onnxruntime": ort.__version__, "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":
    sys.exit(worker_main(job))
