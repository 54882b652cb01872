import json

import numpy as np
import pytest
import torch

from edgekv import calibration as cal, clipping
from edgekv.policy import CachePolicy
from edgekv.reference import quant_torch as qt

POLICY = CachePolicy.uniform(2, 3, sinks=2, window=16, block=8, group=8)
TINY_EXPORT = ["--window", "64", "--block", "8", "--group", "8", "--prefill-chunk", "8"]


def _export(model_dir, out, *flags: str) -> dict:
    """`edgekv export` of the tiny model with `flags` at TINY_EXPORT's geometry: its manifest."""
    from edgekv.cli import main

    assert main(["export", str(model_dir), "-o", str(out), *flags, *TINY_EXPORT]) == 0
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fake_quantize_is_the_cache_quantizer(bits):
    torch.manual_seed(bits)
    k = torch.randn(3, 4, 8, 16) * 3
    codes, s, z = qt.quantize_keys(k, bits)
    assert torch.equal(qt.fake_quantize_keys(k, bits), qt.dequantize_keys(codes, s, z, bits, 8))
    v = torch.randn(3, 40, 16)
    codes, s, z = qt.quantize_values(v, bits, 8)
    assert torch.equal(qt.fake_quantize_values(v, bits, 8), qt.dequantize_values(codes, s, z, bits, 8, 16))


def test_visibility_matches_the_cache_rules():
    n, p = 60, POLICY
    queries = torch.arange(n)
    ring, full = cal.visibility(n, queries, p)
    for t in range(n):
        for s in range(n):
            sink = s < p.sinks
            bt, bs = (t - p.sinks) // p.block, (s - p.sinks) // p.block
            own = not sink and t >= p.sinks and bs == bt and s <= t
            in_ring = not sink and t >= p.sinks and 1 <= bt - bs <= p.window // p.block
            assert bool(full[t, s]) == (s <= t and (sink or own)), (t, s)
            assert bool(ring[t, s]) == in_ring, (t, s)


@pytest.fixture(scope="module")
def captured(tiny_model):
    ids = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    return ids, cal.capture(tiny_model, ids)


def test_capture_records_projections_loss_and_gradient(tiny_model, captured):
    ids, cap = captured
    x = torch.tensor([ids])
    with torch.no_grad():
        out = tiny_model(input_ids=x, labels=x)
        h = tiny_model.model.embed_tokens(x)
        h0 = tiny_model.model.layers[0].input_layernorm(h)
        k0 = tiny_model.model.layers[0].self_attn.k_proj(h0)[0].view(64, 2, 16).transpose(0, 1)
    assert cap.nll == pytest.approx(float(out.loss), rel=1e-5)
    assert torch.equal(cap.k[0], k0.to(torch.float16).float())
    # Directional derivative: nudging layer 1's attention output along u changes the
    # summed loss by eps * <grad, u> (to first order).
    u = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    eps = 1e-3

    def summed_loss(delta):
        hook = tiny_model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
            lambda _m, a: (a[0] + delta,))
        try:
            with torch.no_grad():
                logits = tiny_model(input_ids=x).logits[0, :-1]
            return float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        finally:
            hook.remove()

    fd = (summed_loss(eps * u) - summed_loss(-eps * u)) / (2 * eps)
    assert fd == pytest.approx(float((cap.grad[1] * u).sum()), rel=2e-2)


def _plain_sensitivity(cap, layer, policy, queries, bits, clip=1.0):
    """One query at a time: build exactly the keys/values the cache would show it."""
    q, k, v, g2 = cap.q[layer], cap.k[layer], cap.v[layer], cap.grad_sq[layer]
    hq, n, d = q.shape
    rep = hq // k.shape[0]
    sl = cal._quantizable(n, policy)
    kq, vq = k.clone(), v.clone()
    nb = (sl.stop - sl.start) // policy.block
    kq[:, sl] = qt.fake_quantize_keys(k[:, sl].reshape(-1, nb, policy.block, d), bits, clip=clip).reshape(k[:, sl].shape)
    vq[:, sl] = qt.fake_quantize_values(v[:, sl], bits, policy.group, clip=clip)
    rope = lambda x, idx: cal._rope(x, cap.cos[idx], cap.sin[idx])  # noqa: E731
    total_k = total_v = 0.0
    for t in queries.tolist():
        ring, full = cal.visibility(n, torch.tensor([t]), policy)
        idx = torch.nonzero(ring[0] | full[0]).flatten()
        quant = ring[0][idx]
        qt_ = rope(q[:, t:t + 1], [t]) / d**0.5

        def out(keys, vals):
            kk = rope(keys[:, idx], idx).repeat_interleave(rep, 0)
            p = torch.softmax(qt_ @ kk.transpose(-1, -2), -1)
            return p @ vals[:, idx].repeat_interleave(rep, 0)

        ref = out(k, v)
        k_mixed = torch.where(quant[None, :, None], kq[:, idx], k[:, idx])
        v_mixed = torch.where(quant[None, :, None], vq[:, idx], v[:, idx])
        kk_full, vv_full = k.clone(), v.clone()
        kk_full[:, idx], vv_full[:, idx] = k_mixed, v_mixed
        gt = g2[t].view(hq, 1, d)
        total_k += float((gt * (out(kk_full, v) - ref) ** 2).sum())
        total_v += float((gt * (out(k, vv_full) - ref) ** 2).sum())
    norm = 0.5 * (n / len(queries)) / (n - 1)
    return norm * total_k, norm * total_v


@pytest.mark.parametrize("layer", [0, 1])
def test_layer_sensitivity_matches_a_per_query_reference(captured, layer):
    _, cap = captured
    queries = torch.arange(10, 64, 3)
    k_loss, v_loss = cal.layer_sensitivity(cap, layer, POLICY, queries, clips=(1.0, 0.9))
    # 1 bit also tries the narrow ratios of clipping.ONE_BIT_EXTRA; 8 bits only 1.0
    one_bit = {(1, c) for c in (1.0, 0.9, 0.7, 0.6, 0.5)}
    assert set(k_loss) == set(v_loss) == {(b, c) for b in (2, 3, 4, 5, 6) for c in (1.0, 0.9)} | one_bit | {(8, 1.0)}
    for bits, clip in k_loss:
        pk, pv = _plain_sensitivity(cap, layer, POLICY, queries, bits, clip)
        assert k_loss[bits, clip] == pytest.approx(pk, rel=1e-4, abs=1e-12)
        assert v_loss[bits, clip] == pytest.approx(pv, rel=1e-4, abs=1e-12)
    plain = [k_loss[b, 1.0] for b in (1, 2, 3, 4, 8)]
    assert plain[0] > plain[1] > plain[2] > plain[3] > plain[4] > 0  # coarser codes lose more
    assert k_loss[2, 0.9] != k_loss[2, 1.0]  # the ratio reaches the quantizer


def test_measure_keeps_the_clip_ratio_with_the_least_summed_loss(tiny_model, tiny_model_dir):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    policy = CachePolicy.uniform(2, 3, sinks=2, window=64, block=8, group=8)
    plain = cal.measure(tiny_model, tokenizer, policy, tokens=96, queries=24, clips=(1.0,))
    assert plain.clip == ()
    both = cal.measure(tiny_model, tokenizer, policy, tokens=96, queries=24, clips=(1.0, 0.7))
    for side, rows, plain_rows in (("k", both.key, plain.key), ("v", both.value, plain.value)):
        for j, w in enumerate(both.widths):
            ratio = next((r for s, b, r in both.clip if (s, b) == (side, w)), 1.0)
            summed, summed_plain = sum(r[j] for r in rows), sum(r[j] for r in plain_rows)
            if ratio == 1.0:  # the same measurement as without candidates
                assert summed == pytest.approx(summed_plain, rel=1e-6)
            else:  # chosen only where it lowers the summed prediction
                assert ratio in clipping.for_width((1.0, 0.7), w)[1:] and w < 8 and summed < summed_plain


def test_export_calibrates_by_default_and_records_it(tiny_model_dir, tmp_path):
    out = tmp_path / "cal"
    m = _export(tiny_model_dir, out, "--bits", "2.5", "--value-groups", "fixed", "--head-widths", "off")
    a, p = m["allocation"], m["policy"]
    assert a["layout"] == "calibrated" and a["target_bits"] == 2.5
    assert a["average_bits"] == p["average_bits"] <= 2.5
    assert set(p["bits_k"] + p["bits_v"]) <= {1, 2, 3, 4, 8} and a["calibration"]["tokens"] > 100
    chosen = [c for c in a["selection"]["candidates"] if c["name"] == a["selection"]["chosen"]]
    assert chosen and chosen[0]["bits_k"] == p["bits_k"] and chosen[0]["bits_v"] == p["bits_v"]
    # 8-bit scale + zero per 8 elements, 3 fp16 per block of 8 tokens x 16 channels x 2 KV
    # heads (the default u8s metadata)
    assert p["meta"] == "u8s" and p["residual"] == "u8hr"
    assert m["cache"]["bits_per_element_with_metadata"] == pytest.approx(p["average_bits"] + 2 + 48 / 256)
    out2 = tmp_path / "uni"
    m2 = _export(tiny_model_dir, out2, "--bits", "2.5", "--bits-layout", "uniform")
    assert m2["policy"]["bits_k"] == [3, 3] and m2["policy"]["bits_v"] == [2, 2]
    assert m2["allocation"]["layout"] == "given" and m2["policy"]["clip"] == []
    # Range clipping: chosen by calibration, recorded in the policy and the allocation.
    assert p["clip"] == a["clip"] and a["calibration"]["clip_candidates"][0] == 1.0
    out3 = tmp_path / "minmax"
    m3 = _export(tiny_model_dir, out3, "--bits", "2.5", "--clip", "none")
    assert m3["policy"]["clip"] == [] and m3["allocation"]["calibration"]["clip_candidates"] == [1.0]
    # Query-aware key rounding: on by default, its matrices shipped and hashed; off on request.
    assert p["key_feedback"] == "key_feedback.npy" and "key_feedback.npy" in m["files"]
    assert a["key_rounding"] == "feedback" and a["calibration"]["key_rounding"] == "feedback"
    assert np.load(out / "key_feedback.npy").shape == (2, 2, 16, 16)
    assert m2["policy"]["key_feedback"] is None and not (out2 / "key_feedback.npy").exists()
    out4 = tmp_path / "nearest"
    m4 = _export(tiny_model_dir, out4, "--bits", "2.5", "--key-rounding", "nearest")
    assert m4["policy"]["key_feedback"] is None and m4["allocation"]["key_rounding"] == "nearest"
    from edgekv.runtime.planner import bundle_weights_bytes  # the matrices count as resident memory

    assert bundle_weights_bytes(m) - bundle_weights_bytes(m4) == m["files"]["key_feedback.npy"]["bytes"]
    from edgekv.runtime.bundle import BundleError, open_bundle

    assert open_bundle(out).policy.key_feedback is not None and open_bundle(out4).policy.key_feedback is None
    (out / "key_feedback.npy").unlink()
    with pytest.raises(BundleError, match="key_feedback.npy"):
        open_bundle(out)



def test_export_kv_ratio_fits_the_cache_to_a_fraction_of_fp16(tiny_model_dir, tmp_path, capsys):
    from edgekv.allocation import average_for_fp16_ratio
    from edgekv.cli import main
    from edgekv.policy import CachePolicy, KVShape

    m = _export(tiny_model_dir, tmp_path / "ratio", "--kv-ratio", "0.4")
    base = CachePolicy.uniform(2, 2, window=64, sinks=4, block=8, group=8, rotation="hadamard", meta="u8s",
                               residual="u8hr")
    want = average_for_fp16_ratio(base, KVShape(2, 2, 16), 0.4)
    assert 1 < want < 8 and m["allocation"]["target_bits"] == pytest.approx(want)
    # value groups (the default) may turn metadata into code bits: the bytes are the bound
    assert m["cache"]["fp16_ratio"] <= 0.4 and m["policy"]["groups_v"]
    assert f"the largest average code width that fits is {want:.4g} bits" in capsys.readouterr().out
    for bad, msg in ((["--kv-ratio", "0.4", "--bits", "3"], "not both"),
                     (["--kv-ratio", "0.4", "--bits-layout", "uniform"], "needs the calibrated layout"),
                     (["--kv-ratio", "1.5"], "must lie in (0, 1]"),
                     (["--kv-ratio", "0.05"], "below what 1 bit everywhere needs")):
        assert main(["export", str(tiny_model_dir), "-o", str(tmp_path / "bad"), *bad, *TINY_EXPORT]) == 2
        assert msg in capsys.readouterr().err


def test_sampled_fisher_is_the_expected_squared_gradient(tiny_model):
    """For the last layer, position t's attention output reaches only logits t, so the true
    Fisher there is exactly sum_y p_t(y) * (J_t^T (p_t - e_y))^2; the sampled estimate must
    converge to it (not to the empirical squared gradient of the text's own labels)."""
    ids = torch.randint(0, 96, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    cap = cal.capture(tiny_model, ids, fisher="sampled", samples=1500, seed=5)
    last = tiny_model.model.layers[-1].self_attn.o_proj
    held = {}

    def hook(_m, args):
        a = args[0].detach().requires_grad_(True)
        held["o"] = a
        return (a,)

    h = last.register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            vocab = logits.shape[-1]
            jac = torch.stack([torch.autograd.grad(logits[:, y].sum(), held["o"], retain_graph=True)[0][0, :-1]
                               for y in range(vocab)], 1)  # [T-1, V, Hq*D]
    finally:
        h.remove()
    p = torch.softmax(logits.detach(), -1)  # [T-1, V]
    mean_j = torch.einsum("tv,tvd->td", p, jac)
    exact = torch.einsum("tv,tvd->td", p, (mean_j[:, None] - jac) ** 2)
    sampled = cap.grad_sq[-1][:-1]
    assert float(sampled.sum()) == pytest.approx(float(exact.sum()), rel=0.08)
    per_token = sampled.sum(-1) / exact.sum(-1)
    assert torch.all((per_token > 0.7) & (per_token < 1.3)), per_token
    empirical = cap.grad[-1][:-1] ** 2
    assert not torch.allclose(empirical, exact, rtol=0.3)


def test_export_u8_residual_reaches_the_manifest_and_widens_a_kv_ratio(tiny_model_dir, tmp_path):
    """--residual u8 (u8h more) shrinks the fixed part of the cache, so the same --kv-ratio
    leaves more code bits; the manifest records it and the runtime opens the bundle with it."""
    from edgekv.runtime.bundle import open_bundle

    targets = {}
    for residual in ("fp16", "u8", "u8h"):
        out = tmp_path / residual
        m = _export(tiny_model_dir, out, "--residual", residual, "--kv-ratio", "0.4")
        assert m["policy"]["residual"] == residual and m["cache"]["fp16_ratio"] <= 0.4
        assert open_bundle(out).policy.residual == residual
        targets[residual] = m["allocation"]["target_bits"]
    assert targets["u8h"] >= targets["u8"] > targets["fp16"]


def test_coarse_value_groups_are_measured_as_that_group_would_be(captured):
    """Values at the coarse group give exactly what measuring a policy with that group
    gives; the base group's entries are unchanged."""
    _, cap = captured
    queries = torch.arange(10, 64, 3)
    k_loss, v_loss = cal.layer_sensitivity(cap, 1, POLICY, queries, clips=(1.0, 0.9), coarse_group=16)
    k_plain, v_plain = cal.layer_sensitivity(cap, 1, POLICY, queries, clips=(1.0, 0.9))
    _, v_coarse = cal.layer_sensitivity(cap, 1, POLICY.with_(group=16), queries, clips=(1.0, 0.9))
    assert k_loss == k_plain and {k: v for k, v in v_loss.items() if len(k) == 2} == v_plain
    assert {k[:2]: v for k, v in v_loss.items() if len(k) == 3} == pytest.approx(v_coarse, rel=1e-6)
    assert v_loss[3, 1.0, 16] != v_loss[3, 1.0]


def test_per_head_losses_are_the_layer_loss_on_each_heads_channels(captured):
    """per_head splits a layer's loss by KV head: head h's entry is the loss with the Fisher
    weights of every other group's query channels zeroed, and the entries sum to the layer's."""
    import dataclasses

    _, cap = captured
    queries = torch.arange(10, 64, 3)
    layer, clips = 1, (1.0, 0.9)
    k_layer, v_layer = cal.layer_sensitivity(cap, layer, POLICY, queries, clips=clips, coarse_group=16)
    k_head, v_head = cal.layer_sensitivity(cap, layer, POLICY, queries, clips=clips, coarse_group=16, per_head=True)
    hkv, hq, d = cap.k[layer].shape[0], cap.q[layer].shape[0], cap.q[layer].shape[2]
    channels = hq // hkv * d
    for h in range(hkv):
        g2 = torch.zeros_like(cap.grad_sq[layer])
        g2[:, h * channels:(h + 1) * channels] = cap.grad_sq[layer][:, h * channels:(h + 1) * channels]
        only = dataclasses.replace(cap, grad_sq=[*cap.grad_sq[:layer], g2, *cap.grad_sq[layer + 1:]])
        k_only, v_only = cal.layer_sensitivity(only, layer, POLICY, queries, clips=clips, coarse_group=16)
        assert {key: v[h] for key, v in k_head.items()} == pytest.approx(k_only, rel=1e-5, abs=1e-12)
        assert {key: v[h] for key, v in v_head.items()} == pytest.approx(v_only, rel=1e-5, abs=1e-12)
    assert {key: sum(v) for key, v in k_head.items()} == pytest.approx(k_layer, rel=1e-5)
    assert {key: sum(v) for key, v in v_head.items()} == pytest.approx(v_layer, rel=1e-5)
    assert len(set(k_head[2, 1.0])) == hkv  # the heads differ


def test_calibrated_policy_chooses_value_groups_within_the_budget(tiny_model, tiny_model_dir):
    from transformers import PreTrainedTokenizerFast

    from edgekv.reference.model import kv_shape

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    base = CachePolicy.uniform(2, 3, sinks=2, window=64, block=8, group=8, meta="u8")
    sens = cal.measure(tiny_model, tokenizer, base, tokens=96, queries=24, clips=(1.0,),
                       coarse_group=cal.coarse_group(base, tiny_model, True))
    assert sens.coarse_group == 16 and len(sens.value_coarse) == 2
    policy, record = cal.calibrated_policy(tiny_model, tokenizer, base, 3.0, sens=sens, select=False,
                                           value_groups=True)
    shape = kv_shape(tiny_model.config)
    assert policy.total_bytes(shape) <= base.total_bytes(shape)  # the budget: 3 bits at group 8
    assert set(policy.groups_v or (8, 8)) <= {8, 16} and record["groups_v"] == list(policy.groups_v)
    assert record["predicted_loss_nats"] == pytest.approx(
        sens.predicted_loss(policy.bits_k, policy.bits_v, policy.groups_v))


def test_export_value_groups_stay_within_the_bytes_of_the_target(tiny_model_dir, tmp_path):
    """--value-groups calibrated: each layer's values group by 8 or 16 channels; the cache
    costs no more than --bits at --group everywhere, and the manifest and the runtime agree."""
    from edgekv.runtime.bundle import open_bundle

    ratios = {}
    for choice in ("fixed", "calibrated"):
        out = tmp_path / choice
        m = _export(tiny_model_dir, out, "--value-groups", choice, "--bits", "2.5")
        groups = m["policy"].get("groups_v", [])
        assert groups == m["allocation"]["groups_v"] and set(groups) <= {8, 16}
        assert list(open_bundle(out).policy.groups_v) == groups
        assert (choice == "fixed") <= (groups == [])
        ratios[choice] = m["cache"]["fp16_ratio"]
        if groups:
            assert "value groups 8 or 16" in m["allocation"]["allocator"]
    assert ratios["calibrated"] <= ratios["fixed"] + 1e-12


def test_measure_with_heads_and_the_per_head_candidate(tiny_model, tiny_model_dir):
    """measure(heads=True): per-(layer, head) rows at the layer's chosen ratios that sum to the
    layer rows; calibrated_policy(per_head=True) allocates them into a policy with units
    (the per-head widths average what policy.average_bits says)."""
    from transformers import PreTrainedTokenizerFast

    from edgekv.reference.model import kv_shape

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    base = CachePolicy.uniform(2, 3, sinks=2, window=64, block=8, group=8, meta="u8s")
    sens = cal.measure(tiny_model, tokenizer, base, tokens=96, queries=24, clips=(1.0, 0.9),
                       coarse_group=cal.coarse_group(base, tiny_model, True), heads=True)
    plain = cal.measure(tiny_model, tokenizer, base, tokens=96, queries=24, clips=(1.0, 0.9),
                        coarse_group=cal.coarse_group(base, tiny_model, True))
    assert (sens.key, sens.value, sens.value_coarse, sens.clip) == (plain.key, plain.value, plain.value_coarse,
                                                                     plain.clip)
    hkv = kv_shape(tiny_model.config).num_kv_heads
    heads = sens.per_head()
    assert heads.num_layers == 2 * hkv and plain.key_heads == ()
    for rows, per_layer in ((heads.key, sens.key), (heads.value, sens.value), (heads.value_coarse, sens.value_coarse)):
        summed = [tuple(sum(col) for col in zip(*rows[i * hkv:(i + 1) * hkv])) for i in range(2)]
        assert summed == [pytest.approx(r, rel=1e-5) for r in per_layer]
    for target in (2.0, 3.0):
        policy, record = cal.calibrated_policy(tiny_model, tokenizer, base, target, sens=sens, select=False,
                                               value_groups=True, per_head=True)
        bk, bv, gv = policy.head_widths(hkv)
        assert (sum(bk) + sum(bv)) / (2 * len(bk)) == policy.average_bits()
        assert record["predicted_loss_nats"] == pytest.approx(heads.predicted_loss(bk, bv, gv))
        assert record.get("units", []) == [[i, list(h)] for i, h in policy.units]
    # the prediction of any policy: per head for a split one (edgekv eval and export report it)
    from edgekv.allocation import policy_loss

    split = base.with_head_widths([[1, 3], [2, 2]], [[4, 2], [2, 3]])
    assert split.units and policy_loss(sens, split, hkv) == heads.predicted_loss((1, 3, 2, 2), (4, 2, 2, 3),
                                                                                 (8, 8, 8, 8))
    assert policy_loss(sens, base, hkv) == sens.predicted_loss(base.bits_k, base.bits_v)
    # the per-head candidate joins the selection's (by KL on held-out calibration tokens)
    from edgekv.layout_selection import candidates

    shape = kv_shape(tiny_model.config)
    cands = candidates(sens, base, 2.0, shape=shape)
    per_head = next(p for name, p in cands.items() if "per head" in name)
    # never more bytes than the per-layer allocation, though every split unit stores its own metadata
    assert per_head.total_bytes(shape) <= next(iter(cands.values())).total_bytes(shape)
    assert not any("per head" in name for name in candidates(plain, base, 2.0, shape=shape))
