"""Engine.load(..., backend="tvm"): greedy tokens identical to the onnxruntime backend."""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgekv.policy import CachePolicy  # noqa: E402
from edgekv.runtime import Engine, EngineError  # noqa: E402

try:
    from runtime_helpers import ROOT, make_bundle
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import ROOT, make_bundle


def _feedback():
    """Key feedback matrices (edgekv.key_feedback) for the tiny model's 2 x 2 x 16 x 16."""
    from edgekv.key_feedback import KeyFeedback, step_matrices

    a = np.random.default_rng(1).standard_normal((2, 2, 16, 16))
    return KeyFeedback(step_matrices(a @ np.swapaxes(a, -1, -2) / 16 + 0.01 * np.eye(16)))


@pytest.mark.parametrize("meta,feedback,bits,residual", [
    ("fp16", False, ((4, 8), (2, 16)), "fp16"), ("u8", False, ((1, 5), (6, 1)), "fp16"),
    ("u8", True, ((4, 8), (2, 16)), "fp16"), ("u8", False, ((3, 16), (2, 4)), "u8"),
    ("u8s", False, ((3, 16), (2, 4)), "u8h"), ("u8s", False, ((3, 16), (2, 4)), "u8hr")])
def test_greedy_identical_to_ort(tiny_model, tiny_model_dir, tmp_path, meta, feedback, bits, residual):
    """30-token prompt + 40 tokens through a 32-token window: prefill chunks, padded
    prefill, decode, packing (1/2/4/8-bit layers and fp16 ring parts) and eviction all run
    on both backends, with fp16 or 8-bit scale/zero, keys rounded with feedback
    (pack.onnx then runs each layer's key width only, through an If per width), and
    8-bit sinks/residual."""
    policy = CachePolicy(bits_k=bits[0], bits_v=bits[1], window=32, sinks=4, block=8, group=8, meta=meta,
                         key_feedback=_feedback() if feedback else None, residual=residual)
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    prompt = np.random.default_rng(0).integers(0, 256, 30).tolist()
    got, logits = {}, {}
    for backend in ("ort", "tvm"):
        eng = Engine.load(bundle, backend=backend)
        assert eng.backend.name == backend
        steps, run = [], eng.backend.run
        eng.backend.run = lambda ids, t: steps.append(run(ids, t).copy()) or steps[-1]
        got[backend] = list(eng.generate_tokens(prompt, 40, ignore_eos=True))
        assert eng.state.blocks_pushed > eng.state.slots  # the ring has wrapped: eviction ran
        logits[backend] = np.stack(steps)
    assert got["tvm"] == got["ort"]
    # Every step's logits, not only their argmax (a random tiny model repeats tokens). With
    # "u8hr" a new token's scale is taken over rotated channels, each a sum of all channels,
    # so the attention kernels' fp32 differences upstream flip a tie more often (seen 3.5e-4).
    np.testing.assert_allclose(logits["tvm"], logits["ort"], rtol=0, atol=1e-3 if residual == "u8hr" else 1e-4)


def test_tvm_import_hides_torch():
    code = ("import sys\nfrom edgekv.runtime import tvm_backend\ntvm_backend._import_tvm()\n"
            "assert 'tvm' in sys.modules and 'torch' not in sys.modules, 'torch imported'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, r.stderr


def test_unknown_backend_lists_registry(tmp_path):
    with pytest.raises(EngineError, match="'ort', 'tvm'"):
        Engine.load(tmp_path / "missing", backend="nope")
