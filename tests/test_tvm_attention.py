"""TVM decode / prefill-chunk attention against the float64 reference over the torch
reference cache (tests/tvm_cases.py), every bit width and ragged fills."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
pytest.importorskip("torch")

from edgekv.policy import CachePolicy, KVShape, residual_suffix  # noqa: E402
from edgekv.tvm_kernels.build import build_attention  # noqa: E402
from edgekv.tvm_kernels.targets import host_target  # noqa: E402
from tvm_cases import kernel_case  # noqa: E402

SHAPE = KVShape(num_layers=1, num_kv_heads=2, head_dim=32)
HEADS = 4  # GQA: two query heads per KV head
S, W, B = 4, 64, 16  # four ring slots
# Fills (tokens cached before the new ones): sink phase, empty ring with a partly full
# residual, residual about to fill, ring partly full, ring wrapped around twice.
FILLS = [2, S + 5, S + B - 1, S + 2 * B + 3, S + 9 * B + 7]
TOL = 2e-5  # fp32 accumulation and angle addition vs float64; outputs are O(1)


def _run(params, args, lib=None):
    """The kernel's output for `args`; lib defaults to the host build of `params`."""
    lib = lib or build_attention(params, host_target())
    out = tvm.runtime.empty((1, params.num_heads, params.chunk, params.head_dim), "float32")
    lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("bits_k,bits_v", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 6), (6, 5), (8, 8), (16, 16), (4, 2)])
def test_decode_matches_reference(bits_k, bits_v):
    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16)
    for fill in FILLS:
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, seed=fill)
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


def test_decode_original_positions_and_no_sinks():
    pol = CachePolicy.uniform(1, 3, sinks=0, window=W, block=B, group=16, positions="original")
    for fill in (3, 9 * B + 7):
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, seed=fill)
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


@pytest.mark.parametrize("bits_k,bits_v", [(3, 3), (16, 16), (2, 4), (8, 2)])
def test_prefill_chunk_is_causal(bits_k, bits_v):
    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16)
    for fill in (S, S + 2 * B + 8, S + 9 * B):  # chunks start on chunk boundaries
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, chunk=8, seed=fill)
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


def test_tuning_records_apply_and_match_reference():
    """devices/tuning/cpu-x86_64 holds MetaSchedule records for SmolLM2's 3-bit decode
    kernel (window 1024); the recorded schedule is found and computes the same attention."""
    from edgekv.tvm_kernels.attention import attention_func
    from edgekv.tvm_kernels.tune import tuned_schedule

    pol = CachePolicy.uniform(1, 3, sinks=4, window=1024, block=32, group=32)
    params, args, ref = kernel_case(pol, KVShape(1, 3, 64), 9, 4 + 40 * 32 + 5, seed=3)  # wrapped ring
    assert tuned_schedule(attention_func(params), host_target(), "cpu-x86_64") is not None
    lib = build_attention(params, host_target(), device="cpu-x86_64")
    np.testing.assert_allclose(_run(params, args, lib), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("bits_k,bits_v", [(3, 3), (2, 4), (16, 3), (4, 16)])
def test_rotated_cache_matches_reference(bits_k, bits_v):
    """policy.rotation = hadamard: ring keys are un-rotated in the tile (fast Walsh-Hadamard
    stages) before RoPE, the ring's share of the output once per query head; fp16 sides and
    16-bit layers are not rotated. Decode and a prefill chunk, over a wrapped ring."""
    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16,
                              rotation="hadamard")
    for fill, chunk in ((S + 5, 1), (S + 2 * B + 3, 1), (S + 9 * B + 7, 1), (S + 9 * B, 8)):
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, chunk=chunk, seed=fill)
        assert params.rotate
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


@pytest.mark.parametrize("bits_k,bits_v,meta", [(3, 3, "fp16"), (2, 4, "u8"), (3, 2, "u8s")])
def test_dense_rotation_matches_reference(bits_k, bits_v, meta):
    """The GPU form of the un-rotation (one D-wide reduction with the Sylvester sign from the
    indices instead of butterfly stages), compiled here as plain host loops."""
    from edgekv.tvm_kernels.attention import attention_func
    from edgekv.tvm_kernels.build import compile_module

    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16,
                              rotation="hadamard", meta=meta)
    for fill, chunk in ((S + 2 * B + 3, 1), (S + 9 * B, 8)):
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, chunk=chunk, seed=fill)
        lib = compile_module(tvm.IRModule({"main": attention_func(params, dense_rotation=True)}), host_target())
        np.testing.assert_allclose(_run(params, args, lib), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


@pytest.mark.parametrize("bits_k,bits_v,rotation", [(3, 3, "none"), (2, 4, "hadamard"), (16, 3, "none"), (4, 16, "hadamard")])
def test_u8_metadata_matches_reference(bits_k, bits_v, rotation):
    """policy.meta = u8: scale/zero decoded in the tile from 8-bit codes and the block's
    meta (exp2 where the reference reads a table: within an ulp); decode and a chunk."""
    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16,
                              rotation=rotation, meta="u8")
    for fill, chunk in ((S + 5, 1), (S + 2 * B + 3, 1), (S + 9 * B + 7, 1), (S + 9 * B, 8)):
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, chunk=chunk, seed=fill)
        assert params.meta == "u8"
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")


@pytest.mark.parametrize("bits_k,bits_v,rotation,meta,residual", [
    (3, 3, "none", "fp16", "u8"), (2, 4, "hadamard", "u8", "u8"), (16, 3, "none", "u8", "u8"),
    (4, 16, "hadamard", "fp16", "u8"), (2, 4, "hadamard", "u8", "u8h"), (3, 2, "hadamard", "u8s", "u8h"),
    (3, 2, "hadamard", "u8s", "u8hr"), (16, 3, "none", "u8", "u8hr")])
def test_u8_residual_matches_reference(bits_k, bits_v, rotation, meta, residual):
    """policy.residual = u8/u8h/u8hr: sinks and residual are 8-bit codes with an fp16 scale/zero
    per group (or per head; of the rotated tokens with u8hr, un-rotated in the kernel),
    dequantized where fp16 is widened; the reference ring blocks
    were quantized from the dequantized residual. Sink phase, residual, wrapped ring, and a
    prefill chunk."""
    pol = CachePolicy.uniform(1, bits_k=bits_k, bits_v=bits_v, sinks=S, window=W, block=B, group=16,
                              rotation=rotation, meta=meta, residual=residual)
    for fill, chunk in ((2, 1), (S + 5, 1), (S + B - 1, 1), (S + 9 * B + 7, 1), (S + 9 * B, 8)):
        params, args, ref = kernel_case(pol, SHAPE, HEADS, fill, chunk=chunk, seed=fill)
        assert params.residual == residual and params.key.endswith(residual_suffix(residual))
        cache_args = args[1:1 + len(params.cache_names)]
        assert sum(a.nbytes for a in cache_args) == params.cache_bytes() == pol.layer_bytes(SHAPE, 0)
        np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0, err_msg=f"fill {fill}")
