"""Widths per KV head (policy.units): the policy's units and bytes, and the reference cache,
whose split layers hold each head exactly as a one-width cache at that head's width would."""

import numpy as np
import pytest
import torch

from edgekv.errors import PolicyError
from edgekv.key_feedback import KeyFeedback
from edgekv.policy import CachePolicy, KVShape
from edgekv.reference.cache import CompressedKVCache

SHAPE = KVShape(num_layers=2, num_kv_heads=3, head_dim=16)
GEOMETRY = dict(window=32, sinks=4, block=8, group=8)
# layer 0: heads 0 and 2 at K2/V3, head 1 at K4/V3; layer 1: every head K3/V2
HEAD_BITS_K = [[2, 4, 2], [3, 3, 3]]
HEAD_BITS_V = [[3, 3, 3], [2, 2, 2]]


def test_from_heads_groups_a_layers_heads_into_units():
    p = CachePolicy.from_heads(HEAD_BITS_K, HEAD_BITS_V, **GEOMETRY)
    assert p.units == ((0, (0, 2)), (0, (1,)), (1, (0, 1, 2)))
    assert (p.bits_k, p.bits_v, p.num_layers, p.num_units) == ((2, 4, 3), (3, 3, 2), 2, 3)
    assert p.layer_units(0) == [0, 1] and p.layer_units(1) == [2] and p.unit_layer(1) == 0
    assert p.unit_heads(2, 3) == (0, 1, 2) and "units=3" in p.describe()
    assert p.head_widths(3) == ((2, 4, 2, 3, 3, 3), (3, 3, 3, 2, 2, 2), (8,) * 6)  # from_heads, inverted
    from edgekv.runtime.planner import layer_bits

    assert layer_bits(p) == "layer 0 [h0,2 2:3 h1 4:3], layer 1 3:2"  # what `edgekv plan` prints
    # the mean over every head: (2*2 + 4 + 3*3 ... ) / elements
    assert p.average_bits() == pytest.approx((2 + 4 + 2 + 3 * 3 + 3 * 3 + 2 * 3) / 12)
    # a layout whose layers agree across heads is today's per-layer format
    same = CachePolicy.from_heads([[3] * 3, [2] * 3], [[3] * 3, [4] * 3], **GEOMETRY)
    assert same == CachePolicy(bits_k=(3, 2), bits_v=(3, 4), **GEOMETRY) and same.units == ()


def test_bytes_follow_each_units_heads():
    p = CachePolicy.from_heads(HEAD_BITS_K, HEAD_BITS_V, meta="u8s", residual="u8", **GEOMETRY)
    assert CompressedKVCache(p, SHAPE).nbytes == p.total_bytes(SHAPE)
    specs = p.layer_tensors(SHAPE, 1)  # the 1-head unit
    assert all(t.shape[1] == 1 for t in specs)
    # a token costs what its heads' widths cost, plus one u8s meta set per unit and block
    fixed = p.total_bytes(SHAPE) - p.ring_bytes_per_token(SHAPE) * p.window
    assert fixed == pytest.approx(sum(t.nbytes for u in range(3) for t in p.layer_tensors(SHAPE, u)
                                      if not t.name.startswith("ring")))
    assert p.fp16_ratio(SHAPE) < CachePolicy.uniform(2, 3, meta="u8s", residual="u8", **GEOMETRY).fp16_ratio(SHAPE)


@pytest.mark.parametrize("units,match", [
    (((0, (0, 1)), (0, (1, 2)), (1, (0, 1, 2))), "distinct heads"),
    (((1, (0, 1, 2)), (0, (0,)), (0, (1, 2))), "in order"),
])
def test_bad_units_are_refused(units, match):
    with pytest.raises(PolicyError, match=match):
        CachePolicy(bits_k=(2, 3, 4), bits_v=(2, 3, 4), units=units, **GEOMETRY)


def test_units_must_cover_the_models_heads():
    p = CachePolicy(bits_k=(2, 3, 4), bits_v=(2, 3, 4), units=((0, (0,)), (0, (1,)), (1, (0, 1))), **GEOMETRY)
    with pytest.raises(PolicyError, match="layer 0's units hold heads"):
        p.check_shape(SHAPE)


def _feed(cache, kv, layers):
    t = 0
    while t < kv.shape[2]:
        n = min(5, cache.room(), kv.shape[2] - t)
        for layer in range(layers):
            cache.append(layer, kv[layer, :, :, t:t + n], -kv[layer, :, :, t:t + n] * 0.5)
        cache.commit(n)
        t += n


@pytest.mark.parametrize("meta,residual", [("u8", "u8hr"), ("fp16", "fp16")])
def test_split_layer_holds_each_head_as_its_width_would(meta, residual):
    """Every head of a split layer reads back bit for bit what a per-layer cache at that
    head's widths holds for it (per-head metadata and key feedback, clipping, rotation),
    through eviction."""
    torch.manual_seed(0)
    fb = KeyFeedback(np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32) * 0.05)
    common = dict(meta=meta, residual=residual, rotation="hadamard", key_feedback=fb,
                  clip=(("k", 2, 0.9), ("v", 3, 0.95)), **GEOMETRY)
    split = CachePolicy.from_heads(HEAD_BITS_K, HEAD_BITS_V, **common)
    kv = (torch.randn(2, 1, 3, 4 + 8 * 7 + 3, 16) * 3).to(torch.float16).float()
    got = CompressedKVCache(split, SHAPE)
    _feed(got, kv, 2)
    for layer in range(2):
        k, v = got.view(layer)
        for head in range(3):
            bk, bv = HEAD_BITS_K[layer][head], HEAD_BITS_V[layer][head]
            one = CompressedKVCache(CachePolicy(bits_k=(bk, bk), bits_v=(bv, bv), **common), SHAPE)
            _feed(one, kv, 2)
            ek, ev = one.view(layer)
            assert torch.equal(k[:, head], ek[:, head]) and torch.equal(v[:, head], ev[:, head]), (layer, head)
