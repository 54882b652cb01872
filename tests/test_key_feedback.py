"""Query-aware key rounding (edgekv.key_feedback): the update against the textbook optimal
compensation, the weights against real logits, and the three encoders against each other."""

import numpy as np
import pytest
import torch

from edgekv import quant
from edgekv.errors import PolicyError
from edgekv.key_feedback import DAMP, STEP, KeyFeedback, step_matrices
from edgekv.packing import unpack
from edgekv.policy import CachePolicy, KVShape
from edgekv.reference import quant_torch as qt


def _weights(heads: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated SPD matrices [heads, d, d] with a spread of eigenvalues, as queries give."""
    a = np.random.default_rng(seed).standard_normal((heads, d, d)) * np.linspace(0.1, 3.0, d)
    return a @ np.swapaxes(a, -1, -2) / d + 0.01 * np.eye(d)


def test_each_step_is_the_optimal_compensation():
    """With the channels before a step fixed and that step's error e_S = q_S - x_S, moving
    the later ones by -e_S M_SR M_RR^-1 minimizes e^T M e; the pack moves them by
    -(x_S - q_S) F_SR = e_S F_SR, so F_SR must be -M_SR M_RR^-1."""
    d = 16
    m = _weights(1, d)[0]
    damped = m + DAMP * np.trace(m) / d * np.eye(d)
    f = step_matrices(m)
    for a in range(0, d - STEP, STEP):
        b = a + STEP
        np.testing.assert_allclose(f[a:b, b:], -damped[a:b, b:] @ np.linalg.inv(damped[b:, b:]),
                                   rtol=1e-4, atol=1e-5)
        assert not f[a:b, :b].any()  # earlier and own channels are never touched


def test_diagonal_weights_give_nearest_rounding():
    """Uncorrelated channels leave nothing to compensate: codes equal round-to-nearest."""
    x = np.random.default_rng(1).standard_normal((2, 8, 16)).astype(np.float32)
    f = step_matrices(np.diag(np.linspace(0.5, 4.0, 16))[None].repeat(2, 0))
    assert not f.any()
    for bits in (2, 3):
        assert np.array_equal(quant.quantize_keys(x, bits, feedback=f).codes, quant.quantize_keys(x, bits).codes)


@pytest.mark.parametrize("meta,clip", [("fp16", 1.0), ("u8", 0.9)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_feedback_lowers_the_weighted_error_and_numpy_equals_torch(bits, meta, clip):
    h, b, d = 2, 32, 64
    m = _weights(h, d, seed=bits)
    f = step_matrices(m)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((1, h, b, d)).astype(np.float32)
    near = quant.quantize_keys(x, bits, meta, clip)
    fed = quant.quantize_keys(x, bits, meta, clip, f)
    t = qt.quantize_keys(torch.from_numpy(x), bits, meta, clip, torch.from_numpy(f))
    for got, want in zip(t, fed):
        assert np.array_equal(got.numpy(), want)
    # the same grid (scale, zero, meta), other codes
    assert all(np.array_equal(p, q) for p, q in zip(near[1:], fed[1:]) if p is not None)

    def weighted(q):
        e = quant.dequantize_keys(q, bits, b) - x
        return float(np.einsum("nhti,hij,nhtj->", e, m, e))

    # ~0.45x on these matrices (0.36x on SmolLM2's queries); nearest minimizes plain MSE
    assert weighted(fed) < 0.7 * weighted(near)
    fake = qt.fake_quantize_keys(torch.from_numpy(x), bits, meta, clip, torch.from_numpy(f))
    assert torch.equal(fake, torch.from_numpy(quant.dequantize_keys(fed, bits, b)))


def test_key_weights_predict_the_logit_change(tiny_model):
    """e^T M e from calibration.key_weights = the mean squared change of q.k under the
    model's own RoPE, over the same queries and key distances, for a pre-RoPE key error e."""
    from edgekv.calibration import capture, key_weights
    from edgekv.reference.model import _rotate_half

    cap = capture(tiny_model, list(range(40)), fisher="empirical")
    policy = CachePolicy.uniform(2, 3, window=64, block=8, group=8)
    m = key_weights(tiny_model, cap, policy, distances=8)
    hq, _, d = cap.q[0].shape
    e = torch.randn(d, generator=torch.Generator().manual_seed(0))
    dist = torch.linspace(0, 63, 8).round().long()
    p0 = 5  # the key's position: only the distance matters
    cos, sin = tiny_model.model.rotary_emb(cap.k[0][None], torch.cat([p0 + dist, torch.tensor([p0])])[None])
    cos, sin = cos[0].float(), sin[0].float()
    rope = lambda x, i: x * cos[i] + _rotate_half(x) * sin[i]  # noqa: E731
    for layer in range(2):
        q = cap.q[layer][:, ::2]  # the queries key_weights reads
        for j in range(cap.k[0].shape[0]):
            group = q[j * hq // 2:(j + 1) * hq // 2].reshape(-1, d)
            dl = torch.stack([rope(group, i) @ rope(e, len(dist)) for i in range(len(dist))])
            torch.testing.assert_close(e @ m[layer, j] @ e, (dl ** 2).mean(), rtol=1e-4, atol=1e-6)


def test_key_feedback_object():
    f = step_matrices(_weights(2, 8))[None].repeat(3, 0)
    a, b = KeyFeedback(f), KeyFeedback(f.copy())
    assert a == b and hash(a) == hash(b) and a != KeyFeedback(f * 2)
    assert not a.matrices.flags.writeable
    with pytest.raises(ValueError, match="multiple of 4"):
        KeyFeedback(np.zeros((1, 1, 6, 6)))
    with pytest.raises(ValueError, match="non-finite"):
        KeyFeedback(np.full((1, 1, 4, 4), np.nan))
    policy = CachePolicy.uniform(3, 3, block=8, group=8, key_feedback=a)
    assert "keys=feedback" in policy.describe() and policy == policy.with_(key_feedback=b)
    policy.check_shape(KVShape(3, 2, 8))
    with pytest.raises(PolicyError, match="key feedback matrices"):
        policy.check_shape(KVShape(3, 1, 8))


def test_save_and_load(tmp_path):
    fb = KeyFeedback(step_matrices(_weights(2, 8))[None])
    fb.save(tmp_path)
    assert KeyFeedback.load(tmp_path) == fb
    (tmp_path / "key_feedback.npy").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        KeyFeedback.load(tmp_path)


def test_unpacked_codes_are_per_channel_over_the_block():
    """Feedback codes still pack per channel over the block (the reader is unchanged)."""
    x = np.random.default_rng(3).standard_normal((1, 1, 8, 16)).astype(np.float32)
    f = step_matrices(_weights(1, 16))
    q = quant.quantize_keys(x, 3, feedback=f)
    codes = unpack(q.codes, 3, 8)  # [1, 1, D, B]
    assert codes.shape == (1, 1, 16, 8) and codes.max() <= 7
