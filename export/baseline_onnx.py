"""A standard decoder ONNX export with a growing past-key-values cache, for
`edgekv profile --baseline onnx DIR` (the runtime side is edgekv.profiling.baseline_onnx).

optimum's layout: input_ids, attention_mask, position_ids, past_key_values.{i}.key/.value
-> logits (last position), present.{i}.key/.value; fp32. optimum's exporter cannot be
installed beside this project's transformers (optimum-onnx pins transformers < 4.58), so
this traces the transformers model itself with torch.onnx.export (TorchScript exporter,
eager attention; ~1 s for the tiny model): the same modeling code optimum traces, the
same graph contract, without optimum's graph optimizations. Numerically checked against
the transformers model in tests/test_profile.py (same greedy tokens).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


class PastKV(torch.nn.Module):
    """Flat past tensors in, logits + flat present tensors out."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.n = model, model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for i in range(self.n):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def export_past_kv(model, out: str | Path) -> Path:
    """Write OUT/model.onnx for `model` (a transformers Llama-family model)."""
    out = Path(out)
    cfg = model.config
    n, h = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    past_len, seq = 5, 3
    past = [torch.randn(1, h, past_len, d) for _ in range(2 * n)]
    args = (torch.randint(0, 10, (1, seq)), torch.ones(1, past_len + seq, dtype=torch.int64),
            torch.arange(past_len, past_len + seq)[None], *past)
    past_names = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present_names = [p.replace("past_key_values.", "present.") for p in past_names]
    dyn = {"input_ids": {1: "seq"}, "attention_mask": {1: "total"}, "position_ids": {1: "seq"},
           **{p: {2: "past"} for p in past_names}, **{p: {2: "total"} for p in present_names}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    attn = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # plain MatMul/Softmax attention in the graph
    try:
        with warnings.catch_warnings():  # TracerWarnings on shape checks that hold for any length
            warnings.simplefilter("ignore")
            torch.onnx.export(PastKV(model.eval()), args, str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                              output_names=["logits", *present_names], dynamic_axes=dyn)
    finally:
        model.config._attn_implementation = attn
    return path
