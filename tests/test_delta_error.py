"""Standard errors of Δppl (edgekv.quality.divergence) against plain numpy formulas."""

import math

import numpy as np
import pytest

from edgekv.quality.divergence import DivergenceResult, delta_pct_se, paired_se_pct


def _result(block_delta, tokens) -> DivergenceResult:
    mean = sum(block_delta) / sum(tokens)
    return DivergenceResult(0.0, 10.0, 10.0 * math.exp(mean), sum(tokens), list(block_delta), list(tokens))


def test_equal_blocks_give_the_textbook_standard_error_of_the_mean():
    rng = np.random.default_rng(0)
    per_token = rng.normal(0.01, 0.05, size=(24, 256))  # 24 blocks of 256 tokens
    sums = per_token.sum(1)
    mean = per_token.mean()
    textbook = per_token.mean(1).std(ddof=1) / math.sqrt(24)  # SE of the mean of block means
    r = _result(sums.tolist(), [256] * 24)
    assert r.delta_pct == pytest.approx(100 * math.expm1(mean), rel=1e-12)
    assert r.delta_pct_se == pytest.approx(100 * math.exp(mean) * textbook, rel=1e-12)


def test_the_error_shrinks_like_one_over_root_n_with_more_blocks():
    rng = np.random.default_rng(1)
    few = rng.normal(0.0, 1.0, 16)
    many = np.tile(few, 16)  # the same spread, 16x the blocks
    assert delta_pct_se(many.tolist(), [100] * len(many)) == pytest.approx(
        delta_pct_se(few.tolist(), [100] * 16) / 4, rel=0.05)


def test_paired_error_cancels_the_shared_luck():
    rng = np.random.default_rng(2)
    shared = rng.normal(0.02, 1.0, 24)  # the text's luck, common to both settings
    a = _result((shared + rng.normal(0, 0.01, 24)).tolist(), [256] * 24)
    b = _result((shared + rng.normal(0, 0.01, 24)).tolist(), [256] * 24)
    assert paired_se_pct(a, a) == 0.0
    assert paired_se_pct(a, b) < 0.05 * min(a.delta_pct_se, b.delta_pct_se)
    # dicts (rows read back from eval JSON) work the same
    assert paired_se_pct(vars(a), vars(b)) == pytest.approx(paired_se_pct(a, b), rel=1e-12)
    # independent settings: the variances add
    c = _result(rng.normal(0.02, 1.0, 24).tolist(), [256] * 24)
    assert paired_se_pct(a, c) == pytest.approx(math.hypot(a.delta_pct_se, c.delta_pct_se), rel=0.35)


def test_paired_error_refuses_different_blocks():
    a = _result([0.1, 0.2], [256, 256])
    with pytest.raises(ValueError, match="same blocks"):
        paired_se_pct(a, _result([0.1, 0.2], [256, 128]))
