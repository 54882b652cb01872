"""What `edgekv profile` will run, checked before any worker starts (so a bad bundle
path, device or budget is one clear message, not a worker failure minutes later)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgekv.errors import EdgekvError
from edgekv.profiling.runner import Setting


def bundle_label(manifest: dict) -> str:
    p = manifest["policy"]
    ks, vs = sorted(set(p["bits_k"])), sorted(set(p["bits_v"]))
    if ks == vs and len(ks) == 1:
        bits = "fp16" if ks[0] == 16 else f"{ks[0]}-bit"
    elif len(ks) == 1 and len(vs) == 1:
        bits = f"K{ks[0]}V{vs[0]}"
    else:
        bits = f"mixed {p.get('average_bits', 0):.2f}-bit"
    rot = f" {p['rotation']}" if p.get("rotation", "none") != "none" and bits != "fp16" else ""
    meta = "".join(f" {key} {p[key]}" for key in ("meta", "residual")
                   if p.get(key, "fp16") != "fp16" and bits != "fp16")
    return f"edgekv {bits} W{p['window']}{rot}{meta}"


def bundle_setting(path: str, device: str, budget: int | None) -> Setting:
    """Open the bundle (structure and sizes; the worker verifies hashes) and check that
    it fits the device's budget."""
    from edgekv.runtime.bundle import open_bundle
    from edgekv.runtime.devices import resolve_device
    from edgekv.runtime.planner import plan

    b = open_bundle(path, verify=False)
    dev = resolve_device(device)
    plan(b.manifest, dev, budget)  # raises PlanError naming the window that would fit
    m = b.manifest
    info = {"bundle": str(Path(path)), "source_model": m.get("source_model"), "window": b.policy.window,
            "sinks": b.policy.sinks, "block": b.policy.block, "bits_k": list(b.policy.bits_k),
            "bits_v": list(b.policy.bits_v), "average_bits": b.policy.average_bits(),
            "kv_bytes": b.cache_bytes, "weights_dtype": m["graphs"].get("weights_dtype")}
    return Setting(bundle_label(m), "edgekv", {"bundle": str(path)}, info)


def _need(module: str, what: str, install: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise EdgekvError(f"{what} needs {module}, which is not installed: {install}")


def baseline_settings(specs: list[list[str]]) -> list[Setting]:
    """--baseline hf [MODEL] | onnx DIR | llamacpp GGUF (repeatable)."""
    out: list[Setting] = []
    for spec in specs:
        kind, rest = spec[0], spec[1:]
        if kind == "hf":
            if len(rest) > 1:
                raise EdgekvError(f"--baseline hf takes at most one MODEL, got {' '.join(rest)}")
            _need("torch", "--baseline hf", "pip install 'edgekv[export]'")
            _need("transformers", "--baseline hf", "pip install 'edgekv[export]'")
            model = rest[0] if rest else "default"
            if model != "default" and not Path(model).exists():
                raise EdgekvError(f"--baseline hf model {model!r} does not exist")
            from edgekv.profiling.baseline_hf import CACHES, quanto_available

            out.append(Setting(f"hf fp32 {CACHES['dynamic']}", "hf", {"model": model, "cache": "dynamic"},
                               {"model": model}))
            if quanto_available():
                out.append(Setting(f"hf fp32 {CACHES['quanto4']}", "hf", {"model": model, "cache": "quanto4"},
                                   {"model": model}))
        elif kind == "onnx":
            if len(rest) != 1:
                raise EdgekvError("--baseline onnx takes one DIR (a standard past-key-values ONNX export)")
            from edgekv.profiling.baseline_onnx import find_model

            find_model(rest[0])  # raises if there is no usable model.onnx
            # the directory's name tells two ONNX baselines apart (optimum's vs our own export)
            out.append(Setting(f"onnx past-kv {Path(rest[0]).name}", "onnx", {"model": rest[0]},
                               {"model": rest[0]}))
        elif kind == "llamacpp":
            if len(rest) != 1:
                raise EdgekvError("--baseline llamacpp takes one GGUF file")
            _need("llama_cpp", "--baseline llamacpp",
                  "pip install llama-cpp-python (builds llama.cpp from source, 10+ minutes on 2 cores)")
            if not Path(rest[0]).is_file():
                raise EdgekvError(f"--baseline llamacpp: GGUF file {rest[0]!r} does not exist")
            out.append(Setting("llama.cpp", "llamacpp", {"model": rest[0]}, {"model": rest[0]}))
        else:
            raise EdgekvError(f"unknown baseline {kind!r}: use hf [MODEL], onnx DIR or llamacpp GGUF")
    return out
