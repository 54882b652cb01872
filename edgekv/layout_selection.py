"""Choosing among bit layouts by what they do, not by what the proxy predicts.

The knapsack (edgekv.allocation) optimizes a sum of per-layer loss estimates; where those
estimates are mostly noise it can allocate worse than uniform. So `calibrated_policy`
builds a few candidates -- the allocation from the measured sensitivities, from
sensitivities shrunk halfway toward each side's mean, from the measured ones over the
coarser widths COARSE_WIDTHS only, with per-head sensitivities the allocation of a width
per KV head (policy.units), and the uniform layout -- and keeps
the one whose next-token distributions stay closest (mean KL) to the fp16 cache's on
calibration tokens the sensitivities were not measured on. Perplexity deltas could not make
this choice (a held-out check by Δppl picked the worse layout in 2 of 4 settings); KL
ranks close layouts stably (edgekv.quality.divergence). Needs torch.
"""

from __future__ import annotations

import time

from edgekv.allocation import Sensitivity, allocate, shrink, uniform_pair
from edgekv.errors import PolicyError
from edgekv.policy import CachePolicy, KVShape

ALPHAS = (1.0, 0.5)  # measured sensitivities, and halfway to every layer alike
# Finer steps (5 and 6 bits) also give the knapsack more ways to fit the noise of its
# estimates: on SmolLM2 they won at 4 bits and lost at 3.5 (BENCHMARKS.md "Five- and
# six-bit widths"), so the allocation without them stays a candidate.
COARSE_WIDTHS = (1, 2, 3, 4, 8)
SELECTION_TOKENS = 1024


def candidates(sens: Sensitivity, base: CachePolicy, target: float,
               fine_cost: float = 0.0, shape: KVShape | None = None) -> dict[str, CachePolicy]:
    """Distinct layouts by name, the plain allocation first. With `sens.value_coarse` the
    allocations choose value groups too (allocation.allocate, `fine_cost`); with per-head
    sensitivities and the model's `shape`, a width per KV head (`per_head_layout`)."""
    out: dict[str, CachePolicy] = {}

    def layout(s: Sensitivity) -> CachePolicy:
        a = allocate(s, target, base.group, fine_cost)
        return base.with_(bits_k=a.bits_k, bits_v=a.bits_v, groups_v=a.groups_v)

    for alpha in ALPHAS:
        out[f"shrink {alpha:g}"] = layout(sens if alpha == 1.0 else shrink(sens, alpha))
    coarse = sens.restricted(COARSE_WIDTHS)
    if coarse.widths != sens.widths and coarse.widths and min(coarse.widths) <= target:
        out["widths " + ",".join(map(str, coarse.widths))] = layout(coarse)
    if sens.key_heads and shape is not None:
        out["per head"] = per_head_layout(sens, base, target, fine_cost, shape, out["shrink 1"].total_bytes(shape))
    try:
        bk, bv = uniform_pair(target)
        n = base.num_layers
        out["uniform"] = base.with_(bits_k=(bk,) * n, bits_v=(bv,) * n)
    except PolicyError:
        pass  # no K/V pair averages this target (e.g. 2.7)
    unique: dict[tuple, tuple[str, CachePolicy]] = {}
    for name, p in out.items():  # one entry per layout; its name lists every way it arose
        key = (p.bits_k, p.bits_v, p.groups_v, p.units)
        unique[key] = (f"{unique[key][0]} = {name}", p) if key in unique else (name, p)
    return dict(unique.values())


def per_head_layout(sens: Sensitivity, base: CachePolicy, target: float, fine_cost: float,
                    shape: KVShape, max_bytes: int) -> CachePolicy:
    """Widths per KV head (policy.units) allocated over every head, within `max_bytes`. The
    knapsack counts code and scale/zero bits per element; a split layer also stores "u8"
    block metadata per unit, so where that overshoots, the average is lowered by one bit
    on one head's side at a time until the cache fits."""
    heads = sens.per_head()
    h = shape.num_kv_heads
    rows = lambda t: [t[i:i + h] for i in range(0, len(t), h)] if t else None  # noqa: E731
    step = 1.0 / (2 * len(heads.key))  # one bit of one (layer, head, side)
    for k in range(64):
        a = allocate(heads, target - k * step, base.group, fine_cost)
        policy = base.with_head_widths(rows(a.bits_k), rows(a.bits_v), rows(a.groups_v))
        if policy.total_bytes(shape) <= max_bytes:
            return policy
    raise PolicyError(f"no per-head layout within {max_bytes} bytes")  # never seen: each step saves far more


def select(model, ids: list[int], sens: Sensitivity, base: CachePolicy,
           target: float, fine_cost: float = 0.0) -> tuple[str, CachePolicy, dict]:
    """(name, policy, record) of the candidate with the least mean KL from the fp16 cache
    of the same geometry over `ids` (calibration tokens)."""
    from edgekv.quality.divergence import divergences
    from edgekv.reference.model import ReferenceModel

    t0 = time.perf_counter()
    from edgekv.reference.model import kv_shape

    cands = candidates(sens, base, target, fine_cost, kv_shape(model.config))
    fp16 = ReferenceModel(model, base.fp16_equivalent())
    scores = divergences(fp16, [ReferenceModel(model, p) for p in cands.values()], ids)
    kl = {name: s.kl for name, s in zip(cands, scores)}
    best = min(kl, key=kl.get)  # ties: the first, i.e. the plain allocation
    record = {"method": "least mean KL(fp16 cache || candidate) of the next-token distributions",
              "tokens": len(ids), "candidates": [{"name": k, "kl": v, "bits_k": list(cands[k].bits_k),
                                                 "bits_v": list(cands[k].bits_v), "groups_v": list(cands[k].groups_v),
                                                 **({"units": [[i, list(h)] for i, h in cands[k].units]}
                                                    if cands[k].units else {})}
                                                for k, v in kl.items()],
              "chosen": best, "seconds": round(time.perf_counter() - t0, 2)}
    return best, cands[best], record
