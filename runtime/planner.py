"""Memory planning: what fits a device's budget, by part, before anything is allocated.

    total = weights + KV cache + workspace

* weights: bytes the weights occupy in memory. For a bundle that is weights.bin (mapped
  once and shared by both graphs, see ort_backend); for a Hugging Face directory it is
  the parameter count (read from the safetensors headers, or estimated from
  config.json) times the export dtype.
* KV: every cache buffer, `CachePolicy.total_bytes` (exactly what CacheState allocates).
* workspace: onnxruntime's working memory for the larger graph (prefill, T = C tokens)
  with L = S + W + B + C attention slots, in fp32 bytes, plus the process itself:
      act   = 4*T*(8*hidden + 4*intermediate + 2*Hq*D)     residual stream, norms, q/o, MLP
      deq   = 4*layers*4*Hkv*L*D                          unpacked + dequantized K/V of every
                                                          layer: they depend on graph inputs
                                                          only, so onnxruntime computes them
                                                          early and holds them (measured: this
                                                          memory grows with layers x window)
      layer = 4*(12*Hkv*L*D + 3*Hq*T*L + 4*L*D)            one layer's unpack/RoPE chain,
                                                          scores and probs, cos/sin tables
      head  = 4*2*V                                       last-token logits
      runtime = 100 MiB + 1.5 MiB*layers + 1 KiB*V        Python, numpy, onnxruntime sessions,
                                                          tokenizer (the 100 MiB base: a tiny
                                                          bundle peaks at 75 MiB here and at
                                                          88 MiB on the CI machine; the
                                                          libraries' footprint varies by host)
      workspace = 1.5*(act + deq + layer + head) + runtime
  Fitted on three bundles (activations measured / planned, MiB): SmolLM2-135M W=1024
  53 / 169; 4 layers x W=8192: 159 / 220; 16 layers x W=8192: 348 / 511. Runtime
  measured ~125 MiB for SmolLM2 (planned 193). Peak RSS stays below the plan
  (tests/test_runtime_memory.py checks it). Bundles from before intermediate_size
  was in the manifest get 4*hidden (Llama-family models use 2.7-3.5x).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from edgekv.errors import EdgekvError, PolicyError
from edgekv.key_feedback import FILE as KEY_FEEDBACK_FILE
from edgekv.policy import CachePolicy, KVShape
from edgekv.runtime.devices import DeviceProfile, resolve_device

MiB, GiB = 1 << 20, 1 << 30
RUNTIME_BASE, RUNTIME_PER_LAYER, RUNTIME_PER_VOCAB = 100 * MiB, 3 * MiB // 2, 1 << 10
SAFETY = 1.5
MAX_WINDOW = 1 << 22  # search bound for the largest window (tokens)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": MiB,
          "g": 10**9, "gb": 10**9, "gib": GiB, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


class PlanError(EdgekvError):
    """A request that cannot fit: too small a budget, too long a context."""


def parse_size(size: str | int | float) -> int:
    """'1.5GiB', '800MB', '2g', 123456 -> bytes."""
    if isinstance(size, (int, float)) and not isinstance(size, bool):
        if size <= 0:
            raise PlanError(f"budget must be positive, got {size}")
        return int(size)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read size {size!r}: use a number of bytes or e.g. 1.5GiB, 800MB")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise PlanError(f"budget must be positive, got {size!r}")
    return value


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None

    @property
    def kv_shape(self) -> KVShape:
        return KVShape(self.num_layers, self.num_kv_heads, self.head_dim)

    @classmethod
    def from_manifest(cls, m: dict) -> "ModelDims":
        return cls(int(m["num_layers"]), int(m["num_heads"]), int(m["num_kv_heads"]), int(m["head_dim"]),
                   int(m["hidden_size"]), int(m["vocab_size"]), m.get("intermediate_size"),
                   m.get("max_position_embeddings"))

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelDims":
        try:
            heads = int(c["num_attention_heads"])
            return cls(int(c["num_hidden_layers"]), heads, int(c.get("num_key_value_heads") or heads),
                       int(c.get("head_dim") or c["hidden_size"] // heads), int(c["hidden_size"]),
                       int(c["vocab_size"]), c.get("intermediate_size"), c.get("max_position_embeddings"))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"config.json lacks a Llama-family field ({e})") from None

    def estimate_params(self, tied: bool = False) -> int:
        """Llama-family parameter count (projections, MLP, norms, embeddings)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size or 4 * self.hidden_size
        attn = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2
        per_layer = attn + 3 * h * i + 2 * h
        return self.num_layers * per_layer + self.vocab_size * h * (1 if tied else 2) + h


def workspace_bytes(dims: ModelDims, policy: CachePolicy, chunk: int) -> int:
    """onnxruntime working memory + process estimate (formula in the module doc)."""
    t = max(chunk, 1)
    inter = dims.intermediate_size or 4 * dims.hidden_size
    slots = policy.sinks + policy.ring_capacity() + policy.block + t
    hq, hkv, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    act = 4 * t * (8 * dims.hidden_size + 4 * inter + 2 * hq * d)
    deq = 4 * dims.num_layers * 4 * hkv * slots * d
    layer = 4 * (12 * hkv * slots * d + 3 * hq * t * slots + 4 * slots * d)
    head = 4 * 2 * dims.vocab_size
    runtime = RUNTIME_BASE + RUNTIME_PER_LAYER * dims.num_layers + RUNTIME_PER_VOCAB * dims.vocab_size
    return int(SAFETY * (act + deq + layer + head)) + runtime


def memory_parts(dims: ModelDims, policy: CachePolicy, chunk: int, weights: int) -> dict[str, int]:
    return {"weights": int(weights), "kv": policy.total_bytes(dims.kv_shape),
            "workspace": workspace_bytes(dims, policy, chunk)}


def largest_window(dims: ModelDims, policy: CachePolicy, chunk: int, weights: int, budget: int,
                   cap: int | None = None) -> int | None:
    """Largest window (a multiple of block, <= cap) whose total fits the budget; None if
    not even one block does."""
    b = policy.block

    def fits(blocks: int) -> bool:
        return sum(memory_parts(dims, policy.with_(window=blocks * b), chunk, weights).values()) <= budget

    hi = max(1, (cap or MAX_WINDOW) // b)
    if not fits(1):
        return None
    lo = 1
    while lo < hi:  # fits(lo) holds; total grows with the window
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo * b


@dataclass
class Plan:
    source: str
    kind: str  # "bundle" | "model"
    device: str
    budget: int
    policy: CachePolicy
    chunk: int
    parts: dict[str, int]
    max_window: int | None
    context: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        p = self.policy
        return {"source": self.source, "kind": self.kind, "device": self.device, "budget": self.budget,
                "bits_k": list(p.bits_k), "bits_v": list(p.bits_v), "window": p.window, "sinks": p.sinks,
                "block": p.block, "group": p.group, "positions": p.positions, "prefill_chunk": self.chunk,
                "bytes": {**self.parts, "total": self.total}, "max_window": self.max_window,
                "context": self.context, "notes": self.notes,
                **({"groups_v": list(p.groups_v)} if p.groups_v else {})}

    def describe(self) -> str:
        p = self.policy
        parts = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in self.parts.items())
        lines = [f"{self.kind} {self.source} on {self.device}, budget {fmt_bytes(self.budget)}",
                 f"policy     {p.describe()}, average {p.average_bits():.2f} bits",
                 f"bits K:V   {layer_bits(p)}",
                 f"window     {p.window} tokens (largest that fits: {self.max_window})",
                 f"sinks      {p.sinks}",
                 f"bytes      {parts} = {fmt_bytes(self.total)} ({100 * self.total / self.budget:.0f}% of budget)"]
        return "\n".join(lines + [f"note       {n}" for n in self.notes])


def layer_bits(policy: CachePolicy) -> str:
    """'layers 0-29 3:3' with runs of equal layers merged; a layer whose values group
    by other than policy.group says so ('layer 4 3:3 g64'), a layer split by KV head
    gives each unit's heads ('layer 5 [h0,2 2:3 h1 4:3]')."""
    def unit(u: int) -> str:
        g = policy.value_group(u)
        return f"{policy.bits_k[u]}:{policy.bits_v[u]}" + ("" if g == policy.group else f" g{g}")

    labels = []
    for layer in range(policy.num_layers):
        units = policy.layer_units(layer)
        labels.append(unit(units[0]) if len(units) == 1 else "[" + " ".join(
            "h" + ",".join(map(str, policy.units[u][1])) + " " + unit(u) for u in units) + "]")
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            rng = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
            out.append(f"{rng} {labels[start]}")
            start = i
    return ", ".join(out)


# ---- sources --------------------------------------------------------------------------
def safetensors_params(directory: Path) -> int | None:
    """Parameter count from the safetensors headers (8-byte length + JSON), or None."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for s in t["shape"]:
                    count *= s
                total += count
    return total


def _load_source(source) -> tuple[str, str, dict]:
    """-> (kind, label, data): ('bundle', path, manifest) or ('model', path, config dict
    with '_weights_params' when known)."""
    if isinstance(source, dict):
        if "format_version" in source:
            return "bundle", source.get("source_model", "manifest"), source
        return "model", source.get("_name_or_path", "config"), dict(source)
    path = Path(source)
    if (path / "manifest.json").is_file() or path.name == "manifest.json":
        from edgekv.runtime.bundle import read_manifest

        return "bundle", str(path), read_manifest(path)
    cfg = path / "config.json" if path.is_dir() else path
    if not cfg.is_file():
        raise PlanError(f"{source} is neither a bundle (manifest.json) nor a Hugging Face model "
                        f"directory (config.json)")
    config = json.loads(cfg.read_text())
    params = safetensors_params(cfg.parent)
    if params is not None:
        config["_weights_params"] = params
    return "model", str(path), config


def plan(source, device: str | DeviceProfile = "cpu", budget: str | int | None = None,
         context: int | None = None, bits: int = 3, sinks: int = 4, block: int = 32, group: int = 32,
         weights_dtype: str = "fp32") -> Plan:
    """The policy that fits `device` within `budget` (default: the device's share).

    source: a bundle directory / its manifest dict (policy fixed at export: checks it
    fits and reports the largest window that would), or a Hugging Face directory /
    config dict (bits, sinks, block, group as given; window = `context` rounded up to
    whole blocks if it fits, else the largest that fits)."""
    dev = resolve_device(device)
    budget_b = parse_size(budget) if budget is not None else dev.default_budget()
    if context is not None and context < 1:
        raise PlanError(f"context must be >= 1, got {context}")
    kind, label, data = _load_source(source)
    if kind == "bundle":
        return _plan_bundle(label, data, dev, budget_b, context)
    return _plan_model(label, data, dev, budget_b, context, bits, sinks, block, group, weights_dtype)


GGUF_PREPACK_RATIO = 1.2


def bundle_weights_bytes(manifest: dict) -> int:
    """Resident weight bytes of a bundle: weights.bin, mapped once (fp32 bundles). An fp16
    bundle's Casts are folded by onnxruntime into fp32 copies per graph, so it counts
    the mapped file plus two fp32 copies; a gguf bundle, the file plus two packed copies.
    Key feedback matrices (key_feedback.npy, loaded whole) are counted with them."""
    extra = int(manifest["files"].get(KEY_FEEDBACK_FILE, {}).get("bytes", 0))
    return extra + _weights_file_bytes(manifest)


def _weights_file_bytes(manifest: dict) -> int:
    size = int(manifest["files"].get("weights.bin", {}).get("bytes", 0))
    dtype = manifest["graphs"].get("weights_dtype")
    if dtype == "fp16":
        return size + 2 * 2 * size
    if dtype == "gguf":
        # MatMulNBits' prepacked copy per session (decode, prefill): measured 1.15x the
        # file each on SmolLM2-135M; the mapped file is counted whole, though most of its
        # pages are handed back after prepacking (ort_backend).
        return size + 2 * int(GGUF_PREPACK_RATIO * size)
    return size


def _plan_bundle(label, manifest, dev, budget, context) -> Plan:
    from edgekv.runtime.bundle import manifest_policy

    policy, _ = manifest_policy(manifest)
    dims = ModelDims.from_manifest(manifest["model"])
    chunk = int(manifest["graphs"]["prefill_chunk"])
    weights = bundle_weights_bytes(manifest)
    parts = memory_parts(dims, policy, chunk, weights)
    max_w = largest_window(dims, policy, chunk, weights, budget)
    p = Plan(label, "bundle", dev.name, budget, policy, chunk, parts, max_w, context)
    alloc = manifest.get("allocation") or {}
    if alloc.get("layout") == "calibrated":
        cal = alloc.get("calibration", {})
        p.notes.append(f"bits calibrated for an average of {alloc.get('target_bits')} on "
                       f"{cal.get('tokens')} tokens of held-out text "
                       f"(predicted Δppl {alloc.get('predicted_delta_ppl_pct', float('nan')):+.2f} %)")
    p.notes.append(f"{policy.bits_per_element(dims.kv_shape):.2f} bits per cached element with "
                   f"scale/zero ({policy.average_bits():.2f} code bits)")
    if p.total > budget:
        raise PlanError(_too_big(p, "the bundle", policy.window, max_w, dims, "re-export with --window"))
    if context is not None and context > policy.sinks + policy.window:
        p.notes.append(f"context {context} is longer than the cache span ({policy.sinks} sinks + window "
                       f"{policy.window}): older tokens are evicted as the stream goes on")
    return p


def _plan_model(label, config, dev, budget, context, bits, sinks, block, group, weights_dtype) -> Plan:
    dims = ModelDims.from_hf_config(config)
    per_param = {"fp32": 4, "fp16": 2}[weights_dtype]
    params = config.get("_weights_params") or dims.estimate_params(bool(config.get("tie_word_embeddings")))
    weights = params * per_param
    try:
        base = CachePolicy.uniform(dims.num_layers, bits, sinks=sinks, window=block, block=block, group=group)
        base.check_shape(dims.kv_shape)
    except PolicyError as e:
        raise PlanError(str(e)) from None
    chunk = block
    cap = None
    if dims.max_position_embeddings:  # cache positions stay within the trained range
        cap = max(block, (dims.max_position_embeddings - sinks - block) // block * block)
    max_w = largest_window(dims, base, chunk, weights, budget, None)
    notes = []
    if context is not None:
        window = -(-max(context - sinks, block) // block) * block
    else:
        window = min(max_w, cap) if max_w and cap else max_w
        if max_w and cap and max_w > cap:
            notes.append(f"window capped at {cap}: positions beyond max_position_embeddings "
                         f"{dims.max_position_embeddings} were not trained")
    p = Plan(label, "model", dev.name, budget, base.with_(window=window or block), chunk,
             memory_parts(dims, base.with_(window=window or block), chunk, weights), max_w, context, notes)
    if max_w is None or p.total > budget:
        what = f"context {context}" if context is not None else "the model"
        raise PlanError(_too_big(p, what, p.policy.window, max_w, dims, "ask for a context of at most"))
    if context is not None and cap and window > cap:
        p.notes.append(f"context {context} is past max_position_embeddings {dims.max_position_embeddings}")
    return p


def _too_big(p: Plan, what: str, window: int, max_w: int | None, dims: ModelDims, hint: str) -> str:
    parts = " + ".join(f"{k} {fmt_bytes(v)}" for k, v in p.parts.items())
    msg = (f"{what} needs {fmt_bytes(p.total)} ({parts}) with window {window}, but the budget on "
           f"{p.device} is {fmt_bytes(p.budget)}")
    if max_w is None:
        smallest = memory_parts(dims, p.policy.with_(window=p.policy.block), p.chunk, p.parts["weights"])
        return (msg + f"; not even a window of one block ({p.policy.block}) fits: that needs "
                f"{fmt_bytes(sum(smallest.values()))} (weights {fmt_bytes(smallest['weights'])} + "
                f"workspace {fmt_bytes(smallest['workspace'])})")
    fit = max_w + p.policy.sinks if hint.startswith("ask") else max_w
    return msg + f"; window {max_w} fits in {fmt_bytes(p.budget)}, {window} was asked ({hint} {fit})"
