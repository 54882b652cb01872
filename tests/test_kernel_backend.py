"""Engine.load(..., backend="ort+tvm"): onnxruntime segments + the fused TVM decode kernel
give the onnxruntime backend's greedy tokens and logits."""

import numpy as np
import pytest

pytest.importorskip("tvm")

from edgekv.policy import CachePolicy  # noqa: E402
from edgekv.runtime import Engine  # noqa: E402

try:
    from runtime_helpers import make_bundle
except ImportError:  # tests/ imported as a package
    from tests.runtime_helpers import make_bundle


def _run(bundle, backend, prompt, n):
    eng = Engine.load(bundle, backend=backend)
    assert eng.backend.name == backend
    steps, run = [], eng.backend.run
    eng.backend.run = lambda ids, t: steps.append((t, run(ids, t).copy())) or steps[-1][1]
    toks = list(eng.generate_tokens(prompt, n, ignore_eos=True))
    assert eng.state.blocks_pushed > eng.state.slots  # the ring has wrapped: eviction ran
    return toks, steps


def tvm_backends_match_ort(bundle, atol: dict[str, float]) -> None:
    """ort+tvm (every decode kernel from the bundle's library: no compile warning) and the
    Relax backend give onnxruntime's greedy tokens, and its logits within atol[backend], on
    a 30-token prompt + 60 tokens through the ring."""
    import warnings

    prompt = np.random.default_rng(0).integers(0, 90, 30).tolist()
    want, ref = _run(bundle, "ort", prompt, 60)
    for backend in ("ort+tvm", "tvm"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got, steps = _run(bundle, backend, prompt, 60)
        assert got == want, backend
        assert [t for t, _ in steps] == [t for t, _ in ref]
        np.testing.assert_allclose(np.stack([x for _, x in steps]), np.stack([x for _, x in ref]), rtol=0,
                                   atol=atol[backend], err_msg=backend)


@pytest.mark.parametrize("bits,rotation,meta,residual", [
    (((4, 8), (2, 16)), "none", "fp16", "fp16"), (((5, 1), (1, 6)), "none", "fp16", "fp16"),
    (((3, 16), (2, 4)), "hadamard", "fp16", "fp16"), (((3, 16), (2, 4)), "hadamard", "u8", "fp16"),
    (((3, 16), (2, 4)), "hadamard", "u8", "u8"), (((3, 16), (2, 4)), "hadamard", "u8s", "u8h"),
    (((3, 16), (2, 4)), "none", "u8s", "u8hr")])
def test_greedy_identical_to_ort(tiny_model, tiny_model_dir, tmp_path, bits, rotation, meta, residual):
    """30-token prompt + 60 tokens through a 32-token window: decode steps fill sinks and
    the residual, and attend over a ring that wraps (mixed 1/2/3/4/8/16-bit layers, with and
    without the Hadamard rotation, fp16 or 8-bit scale/zero, fp16 or 8-bit sinks/residual)."""
    policy = CachePolicy(bits_k=bits[0], bits_v=bits[1], window=32, sinks=4, block=8, group=8, rotation=rotation,
                         meta=meta, residual=residual)
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    prompt = np.random.default_rng(0).integers(0, 90, 30).tolist()
    with pytest.warns(RuntimeWarning, match="compiling the decode kernels"):
        got, steps = _run(bundle, "ort+tvm", prompt, 60)
    want, ref = _run(bundle, "ort", prompt, 60)
    assert got == want
    assert [t for t, _ in steps] == [t for t, _ in ref]
    assert sum(t == 1 for t, _ in steps) > 50  # most steps ran the kernels
    # Every step's logits (a random tiny model repeats tokens, so argmax alone says little).
    # "u8hr": a new token's scale is over rotated channels (sums of all its channels), so the
    # kernels' fp32 differences upstream cross an 8-bit rounding tie more often; here one
    # residual code (116 vs 117) at decode step 27, and then a 2-bit ring block's zero code.
    atol = 1e-2 if residual == "u8hr" else 1e-4
    np.testing.assert_allclose(np.stack([x for _, x in steps]), np.stack([x for _, x in ref]), rtol=0, atol=atol)


def test_decode_from_sinks_only(tiny_model, tiny_model_dir, tmp_path):
    """A 1-token prompt: the first steps write sinks, attention sees only them."""
    policy = CachePolicy.uniform(2, 3, window=16, sinks=4, block=8, group=8, rotation="none")
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    outs = {}
    for backend in ("ort", "ort+tvm"):
        eng = Engine.load(bundle, backend=backend)
        outs[backend] = list(eng.generate_tokens([5], 40, ignore_eos=True))
    assert outs["ort+tvm"] == outs["ort"]


def test_uses_the_bundles_compiled_library(tiny_model, tiny_model_dir, tmp_path):
    """After `edgekv compile --device host` the kernels are loaded, not compiled again."""
    import warnings

    from edgekv.cli import main

    policy = CachePolicy.uniform(2, 4, window=16, sinks=4, block=8, group=8, rotation="hadamard")
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    assert main(["compile", str(bundle), "--device", "host"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eng = Engine.load(bundle, backend="ort+tvm")
    got = list(eng.generate_tokens([7, 8, 9], 30, ignore_eos=True))
    want = list(Engine.load(bundle, backend="ort").generate_tokens([7, 8, 9], 30, ignore_eos=True))
    assert got == want


def test_plan_counts_the_backend(tiny_model, tiny_model_dir, tmp_path):
    """ort+tvm's own libraries are part of the memory plan: a budget that fits the
    onnxruntime backend exactly is refused for ort+tvm, with the reason."""
    from edgekv.runtime.planner import PlanError

    policy = CachePolicy.uniform(2, 3, window=16, sinks=4, block=8, group=8)
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    eng = Engine.load(bundle, budget="4GiB", backend="ort")
    tight = eng.plan.total
    Engine.load(bundle, budget=tight, backend="ort")
    with pytest.raises(PlanError, match="backend 'ort\\+tvm' needs"):
        Engine.load(bundle, budget=tight, backend="ort+tvm")


def test_auto_backend_uses_the_kernels_only_when_the_bundle_holds_them(tiny_model, tiny_model_dir, tmp_path):
    from edgekv.tvm_kernels.compile_bundle import compile_bundle

    policy = CachePolicy.uniform(2, 3, window=16, sinks=4, block=8, group=8, rotation="none")
    bundle = make_bundle(tiny_model, tiny_model_dir, tmp_path / "b", policy)
    assert Engine.load(bundle).backend.name == "ort"  # no library: never compile behind the user's back
    compile_bundle(bundle, "host")
    assert Engine.load(bundle).backend.name == "ort+tvm"
    assert Engine.load(bundle, backend="ort").backend.name == "ort"
    # A budget that fits onnxruntime alone but not the kernel backend's libraries: ort.
    plain = Engine.load(bundle, backend="ort").plan.total
    assert Engine.load(bundle, budget=plain + (1 << 20)).backend.name == "ort"
