"""The runtime imports and runs with torch, transformers and onnx unimportable."""

import json

import pytest

from edgekv.policy import CachePolicy
from edgekv.runtime import Engine

try:
    from runtime_helpers import CHAT_TEMPLATE, make_bundle, run_without_torch
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import CHAT_TEMPLATE, make_bundle, run_without_torch


@pytest.fixture(scope="module")
def bundle(tiny_model, tiny_model_dir, tmp_path_factory):
    policy = CachePolicy.uniform(2, 3, window=64, sinks=4, block=8, group=8)
    return make_bundle(tiny_model, tiny_model_dir, tmp_path_factory.mktemp("rt") / "b", policy,
                       chat_template=CHAT_TEMPLATE)


def test_runtime_without_torch(bundle):
    code = f"""
import json, sys
try:
    import torch
    sys.exit("torch imported despite the blocker")
except ImportError:
    pass
from edgekv.runtime import Engine, plan
from edgekv.runtime.cli_commands import add_run, add_chat, add_plan
e = Engine.load({str(bundle)!r})
ids = list(e.generate_tokens(list(range(150)), 40, ignore_eos=True))
text = "".join(e.generate("x" * 200, max_new_tokens=20, ignore_eos=True))
chat = "".join(e.generate([{{"role": "user", "content": "hi"}}], max_new_tokens=5, ignore_eos=True))
p = plan({str(bundle)!r}, device="jetson-orin-nano-8gb")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx")
               or m.startswith(("edgekv.reference", "edgekv.export", "edgekv.quality")))
print(json.dumps({{"ids": ids, "text": text, "window": p.policy.window, "heavy": heavy}}))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [] and out["window"] == 64 and len(out["ids"]) == 40
    # Same tokens as the runtime in this (torch-loaded) process.
    e = Engine.load(bundle)
    assert list(e.generate_tokens(list(range(150)), 40, ignore_eos=True)) == out["ids"]
