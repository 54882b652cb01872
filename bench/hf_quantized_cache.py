"""Peer rows for BENCHMARKS.md: Hugging Face transformers' own caches on the same text.

Runs SmolLM2-135M in plain transformers with DynamicCache (fp32, full context) and with
QuantizedCache (quanto backend, 4 and 2 bits, residual 32), feeding the text in chunks of
32 tokens so each chunk attends to what the cache holds (its quantized past plus the fp
residual), over the same tokens and sequences as bench/quality.sh. Needs optimum-quanto:
`.venv/bin/pip install --no-deps optimum-quanto`. Prints a JSON line per setting.

usage: .venv/bin/python bench/hf_quantized_cache.py [--max-tokens 16384] [--sequences 4]
"""

import argparse
import json
import math
import time

import torch


def run(model, x: torch.Tensor, cache, chunk: int) -> float:
    total, count = 0.0, 0
    n = x.shape[1]
    for start in range(0, n, chunk):
        ids = x[:, start:start + chunk]
        with torch.no_grad():
            logits = model(ids, past_key_values=cache, use_cache=True).logits
        targets = x[:, start + 1:start + 1 + ids.shape[1]]
        lp = torch.log_softmax(logits[:, : targets.shape[1]].float(), -1).gather(-1, targets.unsqueeze(-1))
        total -= float(lp.sum())
        count += targets.numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--json", default="bench/results/hf-caches-smollm2.json")
    args = ap.parse_args()
    from transformers import DynamicCache, QuantizedCache

    from edgekv.export.model_loading import load_model
    from edgekv.quality.text import evaluation_text

    lm = load_model("default")
    ids = lm.tokenizer(evaluation_text()).input_ids[: args.max_tokens]
    n = len(ids) // args.sequences
    x = torch.tensor(ids[: n * args.sequences]).view(args.sequences, n)
    rows = []
    settings = [("HF DynamicCache fp32 (full)", lambda: DynamicCache(config=lm.model.config))]
    for bits in (4, 2):
        settings.append((f"HF QuantizedCache quanto {bits}-bit (full)",
                         lambda b=bits: QuantizedCache(backend="quanto", config=lm.model.config,
                                                       nbits=b, residual_length=args.chunk)))
    for name, make in settings:
        t0 = time.perf_counter()
        ppl = run(lm.model, x, make(), args.chunk)
        row = {"setting": name, "ppl": ppl, "seconds": time.perf_counter() - t0}
        if rows:
            row["delta_pct"] = 100 * (ppl / rows[0]["ppl"] - 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(args.json, "w") as f:
        json.dump({"tokens": n * args.sequences, "sequences": args.sequences, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
