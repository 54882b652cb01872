import itertools
import math
import random

import pytest

from edgekv.allocation import WIDTHS, Sensitivity, allocate, uniform_pair
from edgekv.errors import PolicyError


def _random_sens(layers: int, seed: int) -> Sensitivity:
    """Losses that fall with the width, as quantization noise does (random scale per item)."""
    rng = random.Random(seed)

    def row():
        a = rng.uniform(0.001, 1.0)
        return tuple(a * rng.uniform(0.5, 1.5) / ((1 << w) - 1) ** 2 for w in WIDTHS)

    return Sensitivity(WIDTHS, tuple(row() for _ in range(layers)), tuple(row() for _ in range(layers)))


def _brute_force(sens: Sensitivity, target: float) -> float:
    n = sens.num_layers
    best = float("inf")
    for combo in itertools.product(WIDTHS, repeat=2 * n):
        if sum(combo) <= target * 2 * n + 1e-9:
            best = min(best, sens.predicted_loss(combo[:n], combo[n:]))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [1.5, 2.0, 2.5, 3.0, 3.25, 4.0, 6.0])
def test_knapsack_is_optimal_against_brute_force(seed, target):
    sens = _random_sens(2, seed)
    a = allocate(sens, target)
    assert a.average_bits <= target + 1e-9
    assert all(b in WIDTHS for b in a.bits_k + a.bits_v)
    assert a.predicted_loss == pytest.approx(sens.predicted_loss(a.bits_k, a.bits_v), rel=1e-12)
    assert a.predicted_loss == pytest.approx(_brute_force(sens, target), rel=1e-12)


def test_extremes_and_sensitive_side_gets_the_bits():
    sens = _random_sens(5, 7)
    assert allocate(sens, 1).bits_k == (1,) * 5 and allocate(sens, 1).bits_v == (1,) * 5
    assert allocate(sens, 8).bits_k == (8,) * 5 and allocate(sens, 9).bits_v == (8,) * 5
    with pytest.raises(PolicyError, match="below the smallest width"):
        allocate(sens, 0.5)
    # With 1 bit available a 2-bit average mixes widths where the losses differ.
    two = allocate(sens, 2)
    assert two.average_bits == 2 and 1 in two.bits_k + two.bits_v and max(two.bits_k + two.bits_v) > 2
    # One layer's keys 1000x more sensitive than everything else: it gets the most bits.
    key = [list(r) for r in sens.key]
    key[3] = [x * 1000 for x in key[3]]
    s2 = Sensitivity(WIDTHS, tuple(map(tuple, key)), sens.value)
    a = allocate(s2, 3)
    assert a.bits_k[3] == max(a.bits_k + a.bits_v) and a.bits_k[3] > 3


def test_uniform_pair():
    assert uniform_pair(3) == (3, 3) and uniform_pair(16) == (16, 16)
    assert uniform_pair(2.5) == (3, 2) and uniform_pair(3.5) == (4, 3) and uniform_pair(1.5) == (2, 1)
    assert uniform_pair(5) == (5, 5) and uniform_pair(4.5) == (5, 4) and uniform_pair(7) == (8, 6)
    for target in (2.7, 7.5):
        with pytest.raises(PolicyError):
            uniform_pair(target)


def test_shrink_keeps_at_one_and_makes_layers_alike_at_zero():
    from edgekv.allocation import shrink

    sens = _random_sens(6, seed=7)
    same = shrink(sens, 1.0)
    for a, b in zip(sens.key + sens.value, same.key + same.value):
        assert a == pytest.approx(b, rel=1e-9)
    flat = shrink(sens, 0.0)
    assert len(set(flat.key)) == 1 and len(set(flat.value)) == 1
    # Geometric mean per width: the typical layer, not the loudest one.
    gm = math.exp(sum(math.log(r[0]) for r in sens.key) / 6)
    assert flat.key[0][0] == pytest.approx(gm)
    half = shrink(sens, 0.5)
    spread = lambda s: max(r[0] for r in s.key) / min(r[0] for r in s.key)  # noqa: E731
    assert spread(half) == pytest.approx(spread(sens) ** 0.5)
    # With every layer alike, the knapsack allocates one width per side at integer targets.
    a = allocate(flat, 3.0)
    assert len(set(a.bits_k)) == 1 and len(set(a.bits_v)) == 1 and a.average_bits == 3.0


def test_restricted_sensitivity_is_the_same_measurement_at_fewer_widths():
    sens = _random_sens(3, 1)
    sens = Sensitivity(sens.widths, sens.key, sens.value, clip=(("k", 1, 0.6), ("k", 5, 0.9), ("v", 2, 0.8)))
    r = sens.restricted((1, 2, 3, 4, 8))
    assert r.widths == (1, 2, 3, 4, 8) and r.clip == (("k", 1, 0.6), ("v", 2, 0.8))
    bits_k, bits_v = (1, 3, 8), (4, 2, 2)
    assert r.predicted_loss(bits_k, bits_v) == sens.predicted_loss(bits_k, bits_v)
    assert all(b not in (5, 6) for b in allocate(r, 4.5).bits_k + allocate(r, 4.5).bits_v)


@pytest.mark.parametrize("meta", ["u8", "fp16"])
def test_average_for_a_fp16_ratio_is_the_largest_that_fits(meta):
    """Against brute force over every summed width: the cache of any allocation with the
    returned average fits the ratio, and one more bit anywhere does not."""
    from dataclasses import replace

    from edgekv.allocation import average_for_fp16_ratio
    from edgekv.policy import CachePolicy, KVShape

    shape = KVShape(3, 2, 64)
    base = CachePolicy.uniform(3, 2, window=1024, sinks=4, block=32, group=32, meta=meta)
    fp16 = base.fp16_equivalent().total_bytes(shape)
    rng = random.Random(0)
    for ratio in (0.2, 0.23, 0.3, 0.5, 0.9):
        avg = average_for_fp16_ratio(base, shape, ratio)
        summed = round(avg * 6)
        assert avg * 6 == pytest.approx(summed) and 1 <= avg <= 8

        def fits(total: int) -> bool:  # a random layout with this summed width
            widths = next(w for w in ([rng.choice(WIDTHS) for _ in range(6)] for _ in range(10**5))
                          if sum(w) == total)
            policy = replace(base, bits_k=tuple(widths[:3]), bits_v=tuple(widths[3:]))
            return policy.total_bytes(shape) <= ratio * fp16

        assert all(fits(summed) for _ in range(5))
        if avg < 8:
            assert not fits(summed + 1)
    with pytest.raises(PolicyError, match="below what 1 bit everywhere needs"):
        average_for_fp16_ratio(base, shape, 0.1)


def _with_coarse_values(sens: Sensitivity, seed: int) -> Sensitivity:
    """Coarser value groups lose more, by a random factor per layer."""
    from dataclasses import replace

    rng = random.Random(seed)
    coarse = tuple(tuple(x * rng.uniform(1.0, 3.0) for x in row) for row in sens.value)
    return replace(sens, coarse_group=64, value_coarse=coarse)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("target", [2.0, 2.5, 3.0, 4.0])
def test_value_groups_knapsack_is_optimal_and_meets_the_budget(seed, target):
    """Each value side picks group 32 or 64 (0.25 bit less); against brute force over every
    (width, group) combination, within the bytes of `target` bits at group 32."""
    sens = _with_coarse_values(_random_sens(2, seed), seed)
    a = allocate(sens, target, group=32, fine_cost=0.25)
    assert set(a.groups_v) <= {32, 64} and len(a.groups_v) == 2
    spent = sum(a.bits_k + a.bits_v) - 0.25 * a.groups_v.count(64)
    assert spent <= target * 4 + 1e-9
    assert a.predicted_loss == pytest.approx(sens.predicted_loss(a.bits_k, a.bits_v, a.groups_v), rel=1e-12)
    best = float("inf")
    for combo in itertools.product(WIDTHS, repeat=4):
        for groups in itertools.product((32, 64), repeat=2):
            if sum(combo) - 0.25 * groups.count(64) <= target * 4 + 1e-9:
                best = min(best, sens.predicted_loss(combo[:2], combo[2:], groups))
    assert a.predicted_loss == pytest.approx(best, rel=1e-12)


def test_value_groups_follow_what_the_finer_group_buys():
    """Where the coarse group costs nothing it is taken and what it saves buys a code bit;
    where it costs a lot the metadata stays; without a coarse measurement no groups are chosen."""
    from dataclasses import replace

    sens = _random_sens(4, 3)
    free = replace(sens, coarse_group=64, value_coarse=sens.value)
    a = allocate(free, 3.0, group=32, fine_cost=0.25)
    assert a.groups_v == (64,) * 4 and sum(a.bits_k + a.bits_v) == 25  # 4 x 0.25 bit saved: one more
    dear = replace(sens, coarse_group=64, value_coarse=tuple(tuple(x * 1e6 for x in r) for r in sens.value))
    a = allocate(dear, 3.0, group=32, fine_cost=0.25)
    assert a.groups_v == (32,) * 4 and sum(a.bits_k + a.bits_v) == 24
    assert allocate(sens, 3.0, group=32, fine_cost=0.25).groups_v == ()
    with pytest.raises(PolicyError, match="multiple of 1/32"):
        allocate(free, 3.0, group=32, fine_cost=0.3)
