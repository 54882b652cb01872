"""policy.groups_v (each layer's ring values grouped by their own value group, while the
sinks/residual keep policy.group) in every backend: the ONNX graphs, pack.onnx, the
manifest, the onnxruntime runtime, the TVM kernels and the TVM backends."""

import json

import numpy as np
import pytest

import test_onnx_export
from edgekv import quant
from edgekv.export.onnx_graph import build_decoder
from edgekv.export.onnx_pack import build_pack
from edgekv.policy import CachePolicy, KVShape, packed_prefix
from edgekv.runtime.bundle import BundleError, manifest_policy, open_bundle, read_manifest
from onnx_driver import layer_selectors, session
from runtime_helpers import make_bundle
from test_runtime_engine import _check_greedy

GEOMETRY = dict(window=32, sinks=4, block=8)
# Equal widths in both layers: only the value group tells the layers' attention functions
# (and kernels) apart. Values coarser than the 8-bit residual's group, and finer.
MIXED = {
    "u8-meta": CachePolicy(bits_k=(3, 3), bits_v=(3, 3), group=32, groups_v=(64, 32), meta="u8", residual="u8",
                           **GEOMETRY),
    "fp16-meta": CachePolicy(bits_k=(4, 4), bits_v=(2, 2), group=64, groups_v=(64, 32), residual="u8", **GEOMETRY),
}


@pytest.fixture(scope="module")
def model64():
    """The tiny Llama at SmolLM2's head_dim 64, so that value groups of 64 and 32 fit."""
    from edgekv.export.tiny import tiny_llama

    return tiny_llama(head_dim=64, seed=5)


@pytest.mark.parametrize("name", list(MIXED))
def test_onnx_graphs_match_reference(model64, name):
    """decode.onnx / prefill.onnx / pack.onnx against ReferenceModel (prefill chunks, decode,
    eviction) with a value group per layer."""
    policy = MIXED[name]
    # equal widths: one attention function per value group, the policy group's unsuffixed
    functions = [f.name for f in build_decoder(model64, policy, 1).functions]
    other = next(g for g in policy.groups_v if g != policy.group)
    assert len(functions) == 2 and sum(f"_gv{other}_" in f for f in functions) == 1
    diff = test_onnx_export._compare(model64, policy)
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff < (test_onnx_export.U8_LOGITS_ATOL if policy.meta != "fp16" else test_onnx_export.LOGITS_ATOL)


@pytest.mark.parametrize("residual", ["fp16", "u8"])
@pytest.mark.parametrize("meta", ["fp16", "u8"])
def test_pack_is_bit_exact_per_value_group(meta, residual):
    """pack.onnx packs each (width, value group) a layer uses, from the residual as stored
    (8-bit codes grouped by policy.group), bit-exact with edgekv.quant."""
    shape = KVShape(num_layers=3, num_kv_heads=2, head_dim=64)
    policy = CachePolicy(bits_k=(3, 3, 3), bits_v=(3, 3, 2), group=32, groups_v=(64, 32, 64), meta=meta,
                         residual=residual, window=16, sinks=4, block=8)
    sess = session(build_pack(policy, shape))
    names = [o.name for o in sess.get_outputs()]
    assert {n.rsplit("_", 1)[0] for n in names if n.startswith("v")} == {"v3", "v3g64", "v2g64"}
    rng = np.random.default_rng(0)
    for trial in range(4):
        feeds = {}
        for side in "kv":
            x = (rng.standard_normal((1, 2, 8, 64)) * 10.0 ** rng.uniform(-2, 1)).astype(np.float16)
            if residual == "u8":  # 8-bit codes with a scale/zero per 32 channels (policy.group)
                q = quant.quantize_values(x.astype(np.float32), 8, 32)
                feeds.update({side: q.codes, f"{side}_scale": q.scale, f"{side}_zero": q.zero})
                x = quant.dequantize_values(q, 8, 32, 64)
            else:
                feeds[side] = x
        for layer in range(3):  # the graph computes only the layer's own (width, group)
            selectors = layer_selectors(policy, layer)
            out = dict(zip(names, sess.run(None, {**feeds, **{i.name: selectors[i.name] for i in sess.get_inputs()
                                                              if i.name in selectors}})))
            bits, group = policy.bits_v[layer], policy.value_group(layer)
            own = packed_prefix(policy, 'v', bits, group)
            for part, expect in zip(("codes", "scale", "zero", "meta"), quant.quantize_values(x, bits, group, meta)):
                if expect is not None:
                    got = out[f"{own}_{part}"]
                    assert got.dtype == expect.dtype and np.array_equal(got, expect), (layer, part, trial)
            assert not any(out[n].any() for n in names if n.startswith("v") and not n.startswith(own + "_"))


@pytest.mark.parametrize("name", list(MIXED))
def test_runtime_greedy_identical_to_reference(model64, tiny_model_dir, tmp_path, name):
    """The onnxruntime Engine on a mixed-group bundle: ReferenceModel's greedy tokens, and the
    policy back from the manifest (_check_greedy)."""
    _check_greedy(model64, tiny_model_dir, tmp_path, MIXED[name])


def test_manifest_round_trip(model64, tiny_model_dir, tmp_path):
    policy = MIXED["u8-meta"]
    bundle = make_bundle(model64, tiny_model_dir, tmp_path / "b", policy)
    m = read_manifest(bundle)
    assert m["policy"]["groups_v"] == [64, 32]
    assert [layer["group_v"] for layer in m["cache"]["layers"]] == [64, 32]
    assert open_bundle(bundle).policy == policy
    # Without the field every layer groups values by `group` (bundles before groups_v) ...
    del m["policy"]["groups_v"]
    assert manifest_policy(m)[0].groups_v == () and manifest_policy(m)[0] == policy.with_(groups_v=())
    # ... which here contradicts the cache tensors the manifest lists.
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="cache tensors do not match"):
        open_bundle(bundle, verify=False)
    # A policy at one group writes neither field (manifests as before groups_v).
    m = read_manifest(make_bundle(model64, tiny_model_dir, tmp_path / "p", policy.with_(groups_v=(32, 32))))
    assert "groups_v" not in m["policy"] and not any("group_v" in layer for layer in m["cache"]["layers"])


@pytest.mark.parametrize("chunk,meta", [(1, "u8"), (8, "fp16")])
def test_tvm_attention_reads_the_value_group(chunk, meta):
    """Decode and a prefill chunk over a wrapped ring: values grouped by 64, the 8-bit
    sinks/residual by 32, against the float64 reference (tests/tvm_cases.py)."""
    pytest.importorskip("tvm")
    from test_tvm_attention import HEADS, TOL, B, S, W, _run
    from tvm_cases import kernel_case

    from edgekv.tvm_kernels.params import attn_params

    shape = KVShape(num_layers=1, num_kv_heads=2, head_dim=64)
    pol = CachePolicy.uniform(1, 3, sinks=S, window=W, block=B, group=32, groups_v=(64,), meta=meta, residual="u8")
    fill = S + 9 * B + (7 if chunk == 1 else 0)
    made, args, ref = kernel_case(pol, shape, HEADS, fill, chunk=chunk, seed=fill)  # its params: group_v = group
    params = attn_params(pol, shape, 0, HEADS, chunk)
    assert (params.group, params.group_v) == (32, 64) and "_gv64" in params.key and "_gv" not in made.key
    np.testing.assert_allclose(_run(params, args), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("bits,residual", [(3, "u8"), (4, "fp16")])
def test_tvm_pack_uses_the_value_group(bits, residual):
    """Values packed in groups of 64 from a residual stored in groups of 32, bit-exact."""
    tvm = pytest.importorskip("tvm")
    from test_tvm_pack import _block, _residual

    from edgekv.tvm_kernels.build import build_pack as build_pack_kernel
    from edgekv.tvm_kernels.params import PackParams, pack_params
    from edgekv.tvm_kernels.targets import host_target

    pol = CachePolicy(bits_k=(bits, bits), bits_v=(bits, bits), group=32, groups_v=(64, 32), residual=residual,
                      window=32, sinks=4, block=16)
    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=64)
    p = pack_params(pol, shape, 0, "v")
    assert p == PackParams(2, 64, 16, 32, bits, residual, group_v=64)
    # the residual's group keeps the kernel names that were there before groups_v
    assert pack_params(pol, shape, 1, "v").key == PackParams(2, 64, 16, 32, bits, residual).key != p.key
    assert pack_params(pol, shape, 0, "k").group_v == 32  # keys have no value group
    lib = build_pack_kernel(p, "v", host_target())
    for seed in range(3):
        inputs, x = _residual(np.concatenate([_block(seed), _block(seed + 10)], axis=-1), p)
        ref = quant.quantize_values(x, bits, 64)
        outs = [tvm.runtime.empty(r.shape, str(r.dtype)) for r in ref[:3]]
        lib["main"](*(tvm.runtime.tensor(a) for a in inputs), *outs)
        for name, got, want in zip(("codes", "scale", "zero"), outs, ref):
            np.testing.assert_array_equal(got.numpy(), want, err_msg=f"{name} seed={seed}")


def test_tvm_backends_match_ort(model64, tiny_model_dir, tmp_path):
    """ort+tvm with the bundle's compiled library (a kernel per value group: decode, prefill
    and pack) and the Relax backend give onnxruntime's tokens and logits. (The 8-bit
    residual groups by 32 here: at 64 on this model one new value's fp16 zero lands on a
    rounding boundary that fp32 summation order decides, in ort+tvm without groups_v too.)"""
    pytest.importorskip("tvm")
    from test_kernel_backend import tvm_backends_match_ort

    from edgekv.cli import main

    policy = MIXED["fp16-meta"].with_(group=32)  # values by 64 and 32
    bundle = make_bundle(model64, tiny_model_dir, tmp_path / "b", policy)
    assert main(["compile", str(bundle), "--device", "host"]) == 0
    functions = set(read_manifest(bundle)["tvm"]["host"]["functions"])
    assert functions == {"decode_k4_v2_r8", "decode_k4_v2_gv64_r8", "prefill_k4_v2_r8", "prefill_k4_v2_gv64_r8",
                         "pack_k_b4_r8", "pack_v_b2_r8", "pack_v_b2_gv64_r8"}
    tvm_backends_match_ort(bundle, {"ort+tvm": 1e-4, "tvm": 1e-4})
