"""`--baseline llamacpp GGUF`: llama.cpp through llama-cpp-python on the same GGUF, greedy,
its default f16 cache sized to the longest prompt + new tokens, flash attention on (llama.cpp's
fastest CPU setting for long contexts). Only where
llama-cpp-python is installed (it builds llama.cpp from source: 10+ minutes on 2 cores).
The prompt ids are the bundle tokenizer's; for the same model family they are the GGUF's
own token ids. KV bytes are the f16 cache of the tokens a run held (llama.cpp allocates all
n_ctx slots up front; the used part is what compares with the other rows).

    python -m edgekv.profiling.baseline_llamacpp SPEC.json   (worker; see runner.py)
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from typing import Sequence

from edgekv.runtime.profiler import Progress, measure, timed_stream, worker_main


def job(spec: dict, progress: Progress) -> dict:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    from edgekv.runtime.engine import peak_rss
    from edgekv.runtime.profiler import reset_peak_rss

    prompts = {int(k): v for k, v in spec["prompts"].items()}
    n_ctx = max(prompts) + spec["gen"] + 8
    t0 = time.perf_counter()
    reset_peak_rss()
    llm = Llama(model_path=spec["model"], n_ctx=n_ctx, n_threads=spec.get("threads") or None,
                n_batch=512, flash_attn=True, verbose=False)
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    meta = llm.metadata
    arch = meta["general.architecture"]
    heads, kv_heads = int(meta[f"{arch}.attention.head_count"]), int(meta[f"{arch}.attention.head_count_kv"])
    head_dim = int(meta[f"{arch}.embedding_length"]) // heads
    # K and V, f16, every layer
    bytes_per_token = 2 * 2 * int(meta[f"{arch}.block_count"]) * kv_heads * head_dim
    held = {"tokens": 0}

    def run_once(ids: Sequence[int], gen: int, prog: Progress | None):
        held["tokens"] = len(ids) + gen

        def stream():
            for i, tok in enumerate(llm.generate(list(ids), top_k=1, temp=0.0, reset=True)):
                if i == 0 and prog:
                    prog(len(ids))
                yield tok
                if i == gen - 1:
                    break
        return timed_stream(stream(), prog)

    rows = measure(run_once, prompts, spec["gen"], spec.get("repeat", 1), spec.get("warmup", 1),
                   lambda: held["tokens"] * bytes_per_token, progress)
    return {"load_s": load_s, "load_peak_rss_bytes": load_peak, "model": spec["model"], "n_ctx": n_ctx,
            "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":
    sys.exit(worker_main(job))
