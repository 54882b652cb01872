"""Write an edgekv bundle: one portable directory that plain onnxruntime executes.

    manifest.json   format version, model config, policy, per-layer bits, every cache
                    tensor (name/shape/dtype/bytes), KV bytes at full window, file hashes
    decode.onnx     one new token          prefill.onnx   C new tokens, causal
    pack.onnx       quantize + pack one full block of K and V
    weights.bin     weights as external data, shared by decode and prefill
    tokenizer.json, tokenizer_config.json, chat_template.jinja

Atomic: everything is written to a temporary directory beside the target and renamed at
the end, so a failed or interrupted export leaves no half-written bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgekv import __version__, key_feedback
from edgekv.errors import EdgekvError
from edgekv.bundle_format import FORMAT_VERSION, MANIFEST
from edgekv.files import sha256
from edgekv.policy import CachePolicy


@dataclass
class ExportOptions:
    prefill_chunk: int = 32
    weights_dtype: str = "fp32"  # fp32 | fp16 | gguf (the GGUF's own 4/8-bit blocks, exact)
    opset: int = 18


def check_output_path(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EdgekvError(f"output path {out} is a file; give a directory path for the bundle")
    if out.exists() and any(out.iterdir()) and not force:
        raise EdgekvError(f"output {out} already exists; pass --force to replace it")
    if out.parent.exists() and not out.parent.is_dir():
        raise EdgekvError(f"{out.parent} is a file, not a directory")


def model_config(config) -> dict:
    from edgekv.reference.model import kv_shape

    shape = kv_shape(config)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if not rope and getattr(config, "rope_theta", None):
        rope = {"rope_theta": config.rope_theta, "rope_type": "default"}
    return {
        "model_type": config.model_type, "num_layers": shape.num_layers,
        "num_heads": config.num_attention_heads, "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim, "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size, "intermediate_size": getattr(config, "intermediate_size", None),
        "rope": rope,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": getattr(config, "eos_token_id", None),
    }


def cache_manifest(policy: CachePolicy, shape) -> dict:
    """The cache's buffers and bytes; one "layers" entry per cache unit (a layer, unless
    policy.units splits layers by KV head: then each entry names its layer and heads)."""
    layers = []
    for i in range(policy.num_units):
        tensors = [{"name": f"past.{i}.{t.name}", "shape": list(t.shape), "dtype": t.dtype,
                    "bytes": t.nbytes} for t in policy.layer_tensors(shape, i)]
        group_v = {"group_v": policy.value_group(i)} if policy.groups_v else {}  # absent: policy group
        unit = {"layer": policy.unit_layer(i), "heads": list(policy.units[i][1])} if policy.units else {}
        layers.append({**unit, "bits_k": policy.bits_k[i], "bits_v": policy.bits_v[i], **group_v,
                       "bytes": sum(t["bytes"] for t in tensors), "tensors": tensors})
    return {"layers": layers, "total_bytes": policy.total_bytes(shape),
            "fp16_ratio": policy.fp16_ratio(shape),
            "bytes_per_window_token": policy.ring_bytes_per_token(shape),
            "average_bits": policy.average_bits(),
            "bits_per_element_with_metadata": policy.bits_per_element(shape)}


def write_bundle(loaded, policy: CachePolicy, out: Path, options: ExportOptions,
                 force: bool = False, step: Callable[[str], None] = lambda s: None,
                 allocation: dict | None = None) -> dict:
    """Export `loaded` (export.model_loading.LoadedModel) with `policy` into `out`.
    `step(description)` is called as each stage starts (for a progress bar). `allocation`
    records how the per-layer bits were derived (calibration); None means as given."""
    import onnx

    from edgekv.export.onnx_graph import build_decoder
    from edgekv.export.onnx_pack import build_pack
    from edgekv.export.weights_file import externalize, store_weights_fp16
    from edgekv.reference.model import kv_shape

    out = Path(out)
    check_output_path(out, force)
    shape = kv_shape(loaded.model.config)
    policy.check_shape(shape)
    out.parent.mkdir(parents=True, exist_ok=True)  # like `mkdir -p`: bundles/NAME just works
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        step("tracing decode graph")
        decode = build_decoder(loaded.model, policy, tokens=1)
        step("tracing prefill graph")
        prefill = build_decoder(loaded.model, policy, tokens=options.prefill_chunk)
        pack = build_pack(policy, shape)
        for m in (decode, prefill, pack):
            _set_opset(m, options.opset)
        if options.weights_dtype == "fp16":
            store_weights_fp16(decode)
            store_weights_fp16(prefill)
        quantized = None
        if options.weights_dtype == "gguf":
            step("reading the GGUF's weight blocks")
            quantized = _use_gguf_blocks(loaded, [decode, prefill])
        step("writing weights")
        externalize([decode, prefill], tmp)
        step("checking graphs")
        for name, m in (("decode.onnx", decode), ("prefill.onnx", prefill), ("pack.onnx", pack)):
            onnx.save(m, tmp / name)
            onnx.checker.check_model(str(tmp / name), full_check=True)
        step("writing tokenizer and manifest")
        loaded.tokenizer.save_pretrained(tmp)
        if policy.key_feedback is not None:
            policy.key_feedback.save(tmp)
        manifest = {
            "format_version": FORMAT_VERSION, "edgekv_version": __version__,
            "source_model": Path(loaded.source).name, "model": model_config(loaded.model.config),
            "policy": {"sinks": policy.sinks, "window": policy.window, "block": policy.block,
                       "group": policy.group, "positions": policy.positions,
                       "bits_k": list(policy.bits_k), "bits_v": list(policy.bits_v),
                       "average_bits": policy.average_bits(), "rotation": policy.rotation,
                       "meta": policy.meta, "residual": policy.residual,
                       "clip": [list(c) for c in policy.clip],
                       "key_feedback": None if policy.key_feedback is None else key_feedback.FILE,
                       # absent: every layer's values group by `group` (bundles before groups_v too)
                       **({"groups_v": list(policy.groups_v)} if policy.groups_v else {}),
                       # widths per KV head: bits_k ... then have one entry per unit (absent: per layer)
                       **({"units": [[layer, list(heads)] for layer, heads in policy.units]} if policy.units else {})},
            "graphs": {"decode": "decode.onnx", "prefill": "prefill.onnx", "pack": "pack.onnx",
                       "prefill_chunk": options.prefill_chunk, "opset": options.opset,
                       "weights_dtype": options.weights_dtype,
                       **({"quantized_weights": quantized} if quantized is not None else {})},
            "cache": cache_manifest(policy, shape),
            "allocation": allocation or {"layout": "given", "average_bits": policy.average_bits()},
        }
        manifest["files"] = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def check_gguf_source(source: str | Path) -> Path:
    source = Path(source)
    if source.suffix != ".gguf":
        raise EdgekvError(f"--dtype gguf keeps a GGUF file's own quantized blocks, but {source} is not a "
                          f".gguf file; use --dtype fp32 or fp16 for a Hugging Face directory")
    return source


def _use_gguf_blocks(loaded, graphs: list) -> dict[str, int]:
    """--dtype gguf: every Gemm/Gather weight whose GGUF blocks dequantize exactly to the
    traced fp32 values reads those blocks (export.quantized_matmul); the rest stays fp32."""
    from onnx import numpy_helper

    from edgekv.export import gguf_weights
    from edgekv.export.quantized_matmul import use_quantized_weights

    source = check_gguf_source(loaded.source)
    blocks = gguf_weights.read_gguf_blocks(source)
    cfg = loaded.model.config
    weights = {i.name: numpy_helper.to_array(i) for i in graphs[0].graph.initializer if i.name in blocks}
    exact = gguf_weights.match_exact(blocks, weights, cfg.num_attention_heads, cfg.num_key_value_heads)
    if not exact:
        raise EdgekvError(f"{source.name}: no Q4_0/Q4_1/Q8_0 matrix matches the traced weights exactly; "
                          f"use --dtype fp32")
    counts = [use_quantized_weights(g, exact) for g in graphs]
    return counts[0]


def _set_opset(model, opset: int) -> None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx") and o.version > opset:
            raise EdgekvError(f"--opset {opset} is too old: the graphs need opset {o.version}")
        if o.domain in ("", "ai.onnx"):
            o.version = opset


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target (allowed by --force) is removed only
    after the new bundle is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def bundle_size(out: Path) -> int:
    return sum(p.stat().st_size for p in Path(out).iterdir() if p.is_file())
