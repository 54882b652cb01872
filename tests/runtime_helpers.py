"""Shared helpers for the runtime tests: tiny bundles written in-process (0.1 s each)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# No newline: the char-level test vocabulary has none (it would encode to [UNK]).
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def make_bundle(model, tokenizer_dir: Path, out: Path, policy, chunk: int = 8,
                chat_template: str | None = None, weights_dtype: str = "fp32") -> Path:
    """Export `model` with `policy` into `out`; optionally add a chat template. The
    char-level test tokenizer gets a Fuse decoder, so decoded text re-encodes to the
    same ids (for vocab < 96). Changed files are re-hashed into the manifest, as an
    exporter would have written them."""
    from transformers import AutoTokenizer

    from edgekv.export.bundle import ExportOptions, write_bundle
    from edgekv.export.model_loading import LoadedModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    write_bundle(LoadedModel(model, tok, "tiny"), policy, out, ExportOptions(chunk, weights_dtype), force=True)
    tj = json.loads((out / "tokenizer.json").read_text())
    tj["decoder"] = {"type": "Fuse"}
    (out / "tokenizer.json").write_text(json.dumps(tj))
    rehash(out, "tokenizer.json")
    if chat_template:
        (out / "chat_template.jinja").write_text(chat_template)
        rehash(out, "chat_template.jinja")
    return out


def rehash(bundle: Path, name: str) -> None:
    """Rewrite the manifest entry of one file (to simulate a consistent manifest)."""
    m = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / name).read_bytes()
    m["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


# Runs a snippet with torch, transformers, onnx and the torch-side edgekv packages made
# unimportable: what a device install (numpy + onnxruntime + tokenizers + jinja2) sees.
BLOCKER = """
import sys
BLOCKED = ("torch", "transformers", "onnx", "onnxscript", "edgekv.reference", "edgekv.export",
           "edgekv.quality", "safetensors", "accelerate")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None
sys.meta_path.insert(0, _Block())
"""


def run_without_torch(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))
