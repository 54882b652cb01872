"""The ONNX graphs (decode/prefill/pack) against the numpy and PyTorch references."""

import numpy as np
import onnx
import pytest
import torch

from edgekv import quant
from edgekv.export.onnx_graph import build_decoder, cache_inputs
from edgekv.export.onnx_ops import DOMAIN, OPSET, Emitter, unpack_last, unpack_rows
from edgekv.packing import pack, unpack
from edgekv.export.onnx_pack import build_pack
from edgekv.policy import CachePolicy, KVShape, residual_suffix
from edgekv.reference.model import ReferenceModel, kv_shape
from edgekv.rotation import rotate_exact
from onnx_driver import OnnxDriver, session

# fp32 onnxruntime vs torch: summation order only (seen ~5e-5 on the tiny model); a
# rounding tie flipping one code step would still stay below this.
LOGITS_ATOL = 1e-3
# With 8-bit metadata a block's scale/zero codes hang on its shared meta (lo, dz, top): an
# fp16 residual element that fp32 summation order moved by one ulp upstream can shift the
# meta and so re-quantize the whole block on a slightly different grid (seen 3.6e-3 on the
# tiny model's 2-bit values). Equal inputs give equal bytes (the pack test is bit-exact).
U8_LOGITS_ATOL = 1e-2
GEOMETRY = dict(window=32, sinks=4, block=8, group=8)


def _policy(bits_k, bits_v, **kw):
    return CachePolicy(bits_k=bits_k, bits_v=bits_v, **{**GEOMETRY, **kw})


CLIPS = (("k", 1, 0.6), ("k", 2, 0.8), ("k", 3, 0.95), ("k", 5, 0.975), ("v", 1, 0.5), ("v", 2, 0.85), ("v", 4, 0.9),
         ("v", 6, 0.95))  # edgekv.clipping


def _key_feedback(shape: KVShape):
    """Step matrices from random correlated weights (edgekv.key_feedback)."""
    from edgekv.key_feedback import KeyFeedback, step_matrices

    d = shape.head_dim
    a = np.random.default_rng(7).standard_normal((shape.num_layers, shape.num_kv_heads, d, d)) * np.linspace(0.1, 3, d)
    return KeyFeedback(step_matrices(a @ np.swapaxes(a, -1, -2) / d + 0.01 * np.eye(d)))


@pytest.mark.parametrize("feedback", [False, True], ids=["nearest", "feedback"])
@pytest.mark.parametrize("clip", [(), CLIPS], ids=["minmax", "clipped"])
@pytest.mark.parametrize("meta", ["fp16", "u8", "u8s"])
@pytest.mark.parametrize("block,group,head_dim", [(8, 8, 16), (32, 32, 64)])
def test_pack_is_bit_exact_with_numpy_reference(block, group, head_dim, meta, clip, feedback):
    shape = KVShape(num_layers=7, num_kv_heads=2, head_dim=head_dim)
    policy = _policy((1, 2, 3, 4, 5, 6, 8), (8, 6, 5, 4, 3, 2, 1), block=block, group=group, window=2 * block, meta=meta, clip=clip,
                     key_feedback=_key_feedback(shape) if feedback else None)
    sess = session(build_pack(policy, shape))
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    for trial in range(14):
        k = (rng.standard_normal((1, 2, block, head_dim)) * 10.0 ** rng.uniform(-2, 1)).astype(np.float16)
        v = (rng.standard_normal((1, 2, block, head_dim)) * 10.0 ** rng.uniform(-2, 1)).astype(np.float16)
        k[0, 0, :, 3] = 1.5   # a constant channel: scale 0, codes 0
        v[0, 1, 2, :group] = -2.0  # a constant value group
        layer = trial % 7
        f = policy.key_feedback.layer(layer) if feedback else None
        # pack.onnx computes only the layer's own key and value widths (its selectors)
        extra = {"k_bits": np.array([policy.bits_k[layer]]), "v_bits": np.array([policy.bits_v[layer]])}
        assert [i.name for i in sess.get_inputs()][-2:] == list(extra)
        out = dict(zip(names, sess.run(None, {"k": k, "v": v, **extra, **({"f": f} if feedback else {})})))
        for b in (1, 2, 3, 4, 5, 6, 8):
            for side, q in (("k", quant.quantize_keys(k, b, meta, policy.clip_ratio("k", b), f)),
                            ("v", quant.quantize_values(v, b, group, meta, policy.clip_ratio("v", b)))):
                skipped = b != (policy.bits_k if side == "k" else policy.bits_v)[layer]
                for part, expect in zip(("codes", "scale", "zero", "meta"), q):
                    if expect is None:
                        continue
                    got = out[f"{side}{b}_{part}"]
                    assert got.dtype == expect.dtype and got.shape == expect.shape
                    if skipped:
                        assert not got.any(), (side, b, part, trial)
                    else:
                        assert np.array_equal(got, expect), (side, b, part, trial)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_unpack_matches_packing_reference(bits):
    """Production geometry (B=32, D=64: several 8-code groups per row), both layouts; the
    fp32 codes are exact integers."""
    b, d = 32, 64
    rng = np.random.default_rng(bits)
    key_codes = rng.integers(0, 1 << bits, (1, 2, 3, d, b), dtype=np.uint8)  # [1,H,nblk,D,B]
    val_codes = rng.integers(0, 1 << bits, (1, 2, 40, d), dtype=np.uint8)  # [1,H,W,D]
    for fn, codes, expect in ((lambda e: unpack_rows(e, "x", bits), key_codes, np.swapaxes(key_codes, -1, -2)),
                              (lambda e: unpack_last(e, "x", bits), val_codes, val_codes)):
        e = Emitter()
        e.op("Identity", fn(e), out="y")
        packed = pack(codes, bits)
        assert np.array_equal(unpack(packed, bits, codes.shape[-1]), codes)
        graph = onnx.helper.make_graph(
            e.nodes, "unpack", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, packed.shape)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
        model.ir_version = 9
        (got,) = session(model).run(None, {"x": packed})
        assert got.dtype == np.float32 and np.array_equal(got, expect.astype(np.float32))


@pytest.mark.parametrize("bits_k,bits_v", [((4, 8), (2, 16)), ((3, 16), (3, 8))])
def test_graph_contract_and_full_check(tiny_model, tmp_path, bits_k, bits_v):
    policy = _policy(bits_k, bits_v)
    shape = kv_shape(tiny_model.config)
    for t in (1, 8):
        m = build_decoder(tiny_model, policy, t)
        onnx.checker.check_model(m, full_check=True)
        assert {f.name for f in m.functions} == {f"CompressedAttention_k{k}_v{v}" for k, v in zip(bits_k, bits_v)}
        assert all(f.domain == DOMAIN for f in m.functions)
        ins = {i.name: i for i in m.graph.input}
        assert [i.name for i in m.graph.input][:4] == ["input_ids", "new_positions", "cache_positions",
                                                       "cache_valid"]
        assert [d.dim_value for d in ins["cache_valid"].type.tensor_type.shape.dim] == [4 + 32 + 8]
        for name, s, dt in cache_inputs(policy, shape):
            tt = ins[name].type.tensor_type
            assert [d.dim_value for d in tt.shape.dim] == list(s)
            assert onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) == np.dtype(dt)
        outs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
        assert outs["logits"] == [1, 1, 256] and outs["new.1.v"] == [1, 2, t, 16]
    # Weights as external data, checked and run from the path.
    path = tmp_path / "decode.onnx"
    onnx.save(m, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="decode.onnx.data", size_threshold=0)
    onnx.checker.check_model(str(path), full_check=True)
    assert path.stat().st_size < 200_000 and (tmp_path / "decode.onnx.data").stat().st_size > 400_000
    session(str(path))


def _compare(model, policy, prompt=60, new_tokens=40, seed=0, context=None):
    """Prompt in prefill chunks (chunk = block) then greedy decode, against ReferenceModel
    fed the same segments. Returns the max logit difference."""
    drv = OnnxDriver.from_model(model, policy, chunk=policy.block, context=context)
    ref = ReferenceModel(model, policy)
    cache = ref.new_cache(context=context)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(seed))
    diff, start = 0.0, 0
    runs = drv.forward(ids[0].numpy())
    assert any(n == policy.block for n, _ in runs)  # the prefill graph was used
    for n, got in runs:
        expect = ref.forward(ids[:, start:start + n], cache)[0, -1].numpy()
        diff, start = max(diff, float(np.abs(got - expect).max())), start + n
    assert expect.std() > 0.1  # real signal, not a degenerate model
    got_toks, ref_toks = [], []
    for _ in range(new_tokens):
        got_toks.append(int(got.argmax()))
        ref_toks.append(int(expect.argmax()))
        assert got_toks == ref_toks
        got = drv.forward(np.array([got_toks[-1]]))[-1][1]
        expect = ref.forward(torch.tensor([[ref_toks[-1]]]), cache)[0, -1].numpy()
        diff = max(diff, float(np.abs(got - expect).max()))
    if policy.window is not None:
        assert cache.blocks_pushed > cache.ring_slots  # eviction happened
    assert drv.blocks_pushed == cache.blocks_pushed and drv.n_res == cache.n_res
    return diff


@pytest.mark.parametrize("bits_k,bits_v,positions", [
    (16, 16, "cache"), (4, 4, "cache"), (3, 3, "cache"), (2, 2, "cache"),
    ((4, 8), (2, 16), "cache"), (16, 16, "original"), (3, 3, "original"), ((4, 8), (2, 16), "original"),
])
def test_logits_and_greedy_tokens_match_reference(tiny_model, bits_k, bits_v, positions):
    n = tiny_model.config.num_hidden_layers
    bk = bits_k if isinstance(bits_k, tuple) else (bits_k,) * n
    bv = bits_v if isinstance(bits_v, tuple) else (bits_v,) * n
    diff = _compare(tiny_model, _policy(bk, bv, positions=positions))
    print(f"max |logit diff| {diff:.2e}")
    assert diff < LOGITS_ATOL


def test_qwen2_biases_and_tied_embeddings():
    from edgekv.export.tiny import tiny_llama

    model = tiny_llama(model_type="qwen2", seed=1)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(model.model.layers[0].self_attn, name).bias.normal_(0.0, 0.5)
    model.lm_head.weight = model.model.embed_tokens.weight
    policy = _policy((3, 3), (3, 3))
    m = build_decoder(model, policy, 1)
    assert len(m.graph.initializer) == len({i.name for i in m.graph.initializer})
    assert not any(i.name.startswith("lm_head") for i in m.graph.initializer)  # stored once
    assert _compare(model, policy, prompt=40, new_tokens=10) < LOGITS_ATOL


def test_window_less_policy_sized_by_context(tiny_model):
    policy = _policy((3, 3), (4, 4), window=None)
    m = build_decoder(tiny_model, policy, 1, context=64)
    ins = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert ins["past.0.ring_v_codes"] == [1, 2, 64, 8] and ins["cache_valid"] == [4 + 64 + 8]
    assert _compare(tiny_model, policy, prompt=30, new_tokens=20, context=64) < LOGITS_ATOL


@pytest.mark.parametrize("bits_k,bits_v", [((4, 8), (2, 16)), ((3, 2), (3, 4)), ((16, 2), (3, 16))])
def test_rotated_cache_matches_reference(tiny_model, bits_k, bits_v):
    """policy.rotation = hadamard: pack.onnx rotates blocks, the attention un-rotates ring keys
    and values (values through the output); the reference rotates the same way. Mixed
    widths include 16-bit sides, which are never rotated."""
    policy = _policy(bits_k, bits_v, rotation="hadamard")
    diff = _compare(tiny_model, policy)
    print(f"rotated: max |logit diff| {diff:.2e}")
    assert diff < LOGITS_ATOL
    assert any(f.name.endswith("_rot") for f in build_pack(policy, kv_shape(tiny_model.config)).functions)


def test_rotation_changes_the_stored_codes(tiny_model):
    """The rotation is really in the graphs: the same block packs to different codes."""
    shape = kv_shape(tiny_model.config)
    plain, rotated = _policy((3, 3), (3, 3)), _policy((3, 3), (3, 3), rotation="hadamard")
    k = np.random.default_rng(0).standard_normal((1, shape.num_kv_heads, 8, shape.head_dim)).astype(np.float16)
    outs = [session(build_pack(p, shape)).run(["k3_codes"], {"k": k, "v": k})[0] for p in (plain, rotated)]
    assert not np.array_equal(*outs)


@pytest.mark.parametrize("bits_k,bits_v,rotation", [
    ((4, 8), (2, 16), "none"), ((3, 2), (3, 4), "hadamard"), ((16, 2), (3, 16), "hadamard"),
    (3, 3, "none"), ((2, 2), (2, 2), "hadamard"),
])
def test_u8_metadata_cache_matches_reference(tiny_model, bits_k, bits_v, rotation):
    """policy.meta = u8: pack.onnx stores 8-bit scale/zero codes and per-block meta, the
    attention decodes them; the reference decodes the same bytes (pack is bit-exact above)."""
    n = tiny_model.config.num_hidden_layers
    bk = bits_k if isinstance(bits_k, tuple) else (bits_k,) * n
    bv = bits_v if isinstance(bits_v, tuple) else (bits_v,) * n
    policy = _policy(bk, bv, rotation=rotation, meta="u8")
    diff = _compare(tiny_model, policy)
    print(f"u8 metadata: max |logit diff| {diff:.2e}")
    assert diff < U8_LOGITS_ATOL
    m = build_decoder(tiny_model, policy, 1)
    quantized = [f for f in m.functions if f.name != "CompressedAttention_k16_v16"]
    assert quantized and all(f.name.endswith("_m8") for f in quantized)
    ins = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    layer = next(i for i in range(n) if bk[i] != 16)
    assert ins[f"past.{layer}.ring_k_scale"] == onnx.TensorProto.UINT8 and f"past.{layer}.ring_k_meta" in ins


@pytest.mark.parametrize("bits_k,bits_v,rotation,meta,residual", [
    ((4, 8), (2, 16), "none", "fp16", "u8"), ((3, 2), (3, 4), "hadamard", "u8", "u8"),
    ((16, 2), (3, 16), "hadamard", "u8", "u8"), ((3, 2), (3, 4), "hadamard", "u8", "u8h"),
    ((3, 2), (3, 4), "hadamard", "u8s", "u8h"), ((3, 2), (3, 4), "hadamard", "u8s", "u8hr"),
    ((4, 8), (2, 16), "none", "u8", "u8hr"),
])
def test_u8_residual_cache_matches_reference(tiny_model, bits_k, bits_v, rotation, meta, residual):
    """policy.residual = u8/u8h/u8hr: the graphs quantize new K/V to 8 bits per token (the outputs
    the driver stores in the sinks/residual), attention and pack.onnx read those codes; the
    reference rounds and stores the same way. 16-bit sides get the dequantized residual."""
    policy = _policy(bits_k, bits_v, rotation=rotation, meta=meta, residual=residual)
    diff = _compare(tiny_model, policy)
    print(f"{residual} residual: max |logit diff| {diff:.2e}")
    assert diff < (U8_LOGITS_ATOL if meta != "fp16" else LOGITS_ATOL)
    m = build_decoder(tiny_model, policy, 1)
    assert all(f.name.endswith(residual_suffix(residual)) for f in m.functions)
    ins = {i.name: i.type.tensor_type.elem_type for i in m.graph.input}
    outs = {o.name: o.type.tensor_type.elem_type for o in m.graph.output}
    for names in (ins, outs):
        assert names[next(n for n in names if n.endswith("sink_k" if names is ins else ".0.k"))] == onnx.TensorProto.UINT8
    assert "past.0.residual_v_scale" in ins and "new.1.v_zero" in outs
    for f in m.functions:  # "u8hr" values under a rotated ring stay rotated (no float64 un-rotation)
        if f.name.startswith("CompressedAttention"):
            doubles = sum(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE for n in f.node)
            folded = residual == "u8hr" and rotation == "hadamard" and "_v16" not in f.name
            assert doubles == (2 if folded else 4 if residual == "u8hr" else 0), f.name


@pytest.mark.parametrize("rotation,residual,rg", [("none", "u8", 8), ("hadamard", "u8", 8), ("hadamard", "u8h", 16),
                                                  ("hadamard", "u8hr", 16), ("none", "u8hr", 16)])
def test_pack_reads_an_8_bit_residual_bit_exactly(rotation, residual, rg):
    """pack.onnx with an 8-bit residual dequantizes the stored residual (un-rotated in float64
    with "u8hr") and packs exactly what numpy packs from those dequantized values."""
    shape = KVShape(num_layers=2, num_kv_heads=2, head_dim=16)
    policy = _policy((3, 16), (2, 4), rotation=rotation, meta="u8", residual=residual)
    sess = session(build_pack(policy, shape))
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(1)
    h = None if rotation == "none" else __import__("edgekv.rotation", fromlist=["hadamard"]).hadamard(16)
    for trial in range(4):
        feeds = {}
        for side in "kv":
            x = (rng.standard_normal((1, 2, 8, 16)) * 10.0 ** rng.uniform(-2, 1)).astype(np.float16)
            q = quant.quantize_values(x.astype(np.float32), 8, rg)
            feeds.update({side: q.codes, f"{side}_scale": q.scale, f"{side}_zero": q.zero})
        layer = trial % 2  # values use widths 2 and 4: the graph computes the layer's own
        out = dict(zip(names, sess.run(None, {**feeds, "v_bits": np.array([policy.bits_v[layer]])})))
        for side, widths in (("k", (3,)), ("v", (policy.bits_v[layer],))):
            x = quant.dequantize_values(quant.Quantized(feeds[side], feeds[f"{side}_scale"], feeds[f"{side}_zero"],
                                                        None), 8, rg, 16)
            if residual == "u8hr":
                x = rotate_exact(x)
            x = x if h is None else x @ h
            for b in widths:
                q = quant.quantize_keys(x, b, "u8") if side == "k" else quant.quantize_values(x, b, 8, "u8")
                for part, expect in zip(("codes", "scale", "zero", "meta"), q):
                    assert np.array_equal(out[f"{side}{b}_{part}"], expect), (side, b, part, trial)
