"""`--baseline hf`: the same model in plain transformers (PyTorch eager, fp32), greedy,
with its default DynamicCache, and with QuantizedCache (quanto, 4 bits) where
optimum-quanto is installed. Needs torch + transformers: imported in the worker only.

The loop is what `model.generate` does, written out so every token gets a timestamp:
one forward over the whole prompt (logits of its last position only, as generate does),
then one forward per new token; the last token chosen is never fed (as in the Engine).

    python -m edgekv.profiling.baseline_hf SPEC.json   (worker; see runner.py)
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Sequence

from edgekv.runtime.profiler import Progress, measure, timed_stream, worker_main

CACHES = {"dynamic": "DynamicCache", "quanto4": "QuantizedCache quanto 4-bit"}


def quanto_available() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:
        return False


def _cache_bytes(cache) -> int:
    """Bytes of the tensors the cache holds (best effort across cache classes)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", []):
        for v in vars(layer).values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def job(spec: dict, progress: Progress) -> dict:
    import os
    import time

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import DynamicCache, QuantizedCache

    from edgekv.export.model_loading import load_model
    from edgekv.runtime.profiler import reset_peak_rss
    from edgekv.runtime.engine import peak_rss

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    kind = spec.get("cache", "dynamic")
    t0 = time.perf_counter()
    reset_peak_rss()
    lm = load_model(spec["model"])
    model, config = lm.model.eval(), lm.model.config
    load_s, load_peak = time.perf_counter() - t0, peak_rss()
    vocab = int(config.vocab_size)
    last: dict = {}

    def new_cache():
        if kind == "quanto4":
            return QuantizedCache(backend="quanto", config=config, nbits=4, residual_length=32)
        return DynamicCache(config=config)

    def run_once(ids: Sequence[int], gen: int, prog: Progress | None):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            from edgekv.errors import EdgekvError
            raise EdgekvError(f"token id {bad[0]} is outside {spec['model']}'s vocabulary: "
                              f"is it the bundle's model? (pass it as --baseline hf MODEL)")

        def stream():
            with torch.inference_mode():
                cache = new_cache()
                last["cache"] = cache
                out = model(torch.tensor([list(ids)]), past_key_values=cache, use_cache=True, logits_to_keep=1)
                if prog:
                    prog(len(ids))
                for step in range(gen):
                    tok = int(out.logits[0, -1].argmax())
                    yield tok
                    if step < gen - 1:
                        out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        return timed_stream(stream(), prog)

    prompts = {int(k): v for k, v in spec["prompts"].items()}
    rows = measure(run_once, prompts, spec["gen"], spec.get("repeat", 1), spec.get("warmup", 1),
                   lambda: _cache_bytes(last.get("cache")), progress)
    from dataclasses import asdict

    return {"load_s": load_s, "load_peak_rss_bytes": load_peak, "model": lm.source,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "attn_implementation": getattr(config, "_attn_implementation", None), "rows": [asdict(r) for r in rows]}


if __name__ == "__main__":
    sys.exit(worker_main(job))
