"""Layout selection by KL on held-out calibration tokens (edgekv.layout_selection)."""

import pytest
import torch

from edgekv.allocation import Sensitivity
from edgekv.layout_selection import candidates, select
from edgekv.policy import CachePolicy

BASE = CachePolicy.uniform(2, 3, window=32, sinks=4, block=8, group=8)


def _sens(key, value):  # losses at widths 2, 3, 4, 8
    return Sensitivity((2, 3, 4, 8), tuple(map(tuple, key)), tuple(map(tuple, value)))


def test_candidates_are_distinct_and_start_with_the_allocation():
    # Layer 0's keys far more sensitive than anything else: the allocation moves bits there.
    sens = _sens([[100, 10, 1, 0.01], [1, 0.1, 0.01, 0.0001]], [[1, 0.1, 0.01, 1e-4]] * 2)
    c = candidates(sens, BASE, 3.0)
    first = list(c)[0]
    assert first.startswith("shrink 1") and "uniform" in c
    assert c["uniform"].bits_k == (3, 3) and c["uniform"].bits_v == (3, 3)
    assert c[first].bits_k[0] > c[first].bits_k[1]
    layouts = [(p.bits_k, p.bits_v) for p in c.values()]
    assert len(layouts) == len(set(layouts))
    # Flat sensitivities: every candidate is the uniform layout, so only one is kept.
    flat = _sens([[1, 0.1, 0.01, 1e-4]] * 2, [[1, 0.1, 0.01, 1e-4]] * 2)
    assert list(candidates(flat, BASE, 3.0)) == ["shrink 1 = shrink 0.5 = uniform"]
    # No K/V pair averages 2.75: no uniform candidate, no error.
    assert "uniform" not in candidates(sens, BASE, 2.75)


def test_select_keeps_the_candidate_with_the_least_kl(tiny_model):
    sens = _sens([[100, 10, 1, 0.01], [1, 0.1, 0.01, 0.0001]], [[1, 0.1, 0.01, 1e-4]] * 2)
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(0)).tolist()
    name, policy, record = select(tiny_model, ids, sens, BASE, 2.5)
    kl = {c["name"]: c["kl"] for c in record["candidates"]}
    assert len(kl) >= 2 and record["chosen"] == name == min(kl, key=kl.get)
    chosen = next(c for c in record["candidates"] if c["name"] == name)
    assert list(policy.bits_k) == chosen["bits_k"] and list(policy.bits_v) == chosen["bits_v"]
    assert all(v > 0 for v in kl.values()) and record["tokens"] == 160
    assert policy.average_bits() == pytest.approx(2.5)


def test_the_allocation_over_coarse_widths_stays_a_candidate():
    # Widths 2, 3, 4, 5, 8: layer 0's keys gain most from 4 -> 5, so the full allocation
    # takes 5 bits there; without 5 it must pay for 8 or stay at 4, a different layout.
    row = [1, 0.1, 0.01, 0.005, 1e-4]
    sens = Sensitivity((2, 3, 4, 5, 8), ((100, 10, 1, 0.01, 0.009), tuple(row)), (tuple(row),) * 2)
    c = candidates(sens, BASE, 3.5)
    (full,) = [p for name, p in c.items() if "shrink 1" in name.split(" = ")]
    (coarse,) = [p for name, p in c.items() if "widths 2,3,4,8" in name.split(" = ")]
    assert full.bits_k == (5, 3) and 5 not in coarse.bits_k + coarse.bits_v
    assert coarse.average_bits() <= 3.5 and coarse is not full
    # Measured at the coarse widths only: no extra candidate.
    assert not any(name.startswith("widths") for name in candidates(sens.restricted((2, 3, 4, 8)), BASE, 3.5))
