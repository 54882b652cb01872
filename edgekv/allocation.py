"""Mixed-precision bit allocation: code widths per layer for keys and for values.

`--bits 3` is a promise about memory (the average code width), not a uniform setting.
Given each (layer, side)'s predicted loss at every candidate width (edgekv.calibration
measures it), `allocate` solves the multiple-choice knapsack exactly: choose one width per
(layer, side) so the sum of widths is at most target x 2L (K and V of a layer hold the same
number of elements, so that is the element-weighted average) with the least summed
predicted loss. Numpy/stdlib only: the runtime may read allocations without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from edgekv.errors import PolicyError
from edgekv.key_feedback import KeyFeedback
from edgekv.packing import PACKED_BITS

# Every packed width is a candidate. 5 and 6 bits give a 4-bit average finer steps than
# 4 -> 8 (sensitive sides take 5, the least sensitive 3). 1 bit (two levels, on a range
# calibration narrows to about half) is too coarse for a whole cache, but the least
# sensitive layers can take it and pay for 3 bits elsewhere: with it a calibrated 2-bit
# average stops being uniform 2/2 by construction (BENCHMARKS.md).
WIDTHS = PACKED_BITS


@dataclass(frozen=True)
class Sensitivity:
    """Predicted increase of the mean NLL (nats/token) when only one side of one layer is
    quantized at each width: key[layer][j] for widths[j], same for value."""

    widths: tuple[int, ...]
    key: tuple[tuple[float, ...], ...]
    value: tuple[tuple[float, ...], ...]
    meta: dict = field(default_factory=dict)  # how it was measured (text, tokens, seconds)
    clip: tuple[tuple[str, int, float], ...] = ()  # the range ratios measured at (policy.clip)
    key_feedback: KeyFeedback | None = None  # what keys were measured with (policy.key_feedback)
    # Values measured again with scale/zero per `coarse_group` channels (policy.groups_v):
    # value_coarse[layer][j] like value; () when not measured.
    coarse_group: int | None = None
    value_coarse: tuple[tuple[float, ...], ...] = ()
    # The same per (layer, KV head), layer-major (calibration.measure(heads=True)); () when not
    # measured. A KV head's losses sum to its layer's (calibration.layer_sensitivity).
    key_heads: tuple[tuple[float, ...], ...] = ()
    value_heads: tuple[tuple[float, ...], ...] = ()
    value_coarse_heads: tuple[tuple[float, ...], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(self.key)

    def per_head(self) -> "Sensitivity":
        """The per-head rows as a Sensitivity of their own (an item per layer and KV head:
        `allocate` then gives widths per head, CachePolicy.from_heads makes them a policy)."""
        if not self.key_heads:
            raise PolicyError("these sensitivities were measured per layer only (calibration.measure(heads=True))")
        return replace(self, key=self.key_heads, value=self.value_heads, value_coarse=self.value_coarse_heads,
                       key_heads=(), value_heads=(), value_coarse_heads=())

    def restricted(self, widths) -> "Sensitivity":
        """The same measurement as if only `widths` (those of them measured) had been tried."""
        keep = [j for j, w in enumerate(self.widths) if w in widths]
        pick = lambda rows: tuple(tuple(r[j] for j in keep) for r in rows)  # noqa: E731
        return replace(self, widths=tuple(self.widths[j] for j in keep), key=pick(self.key),
                       value=pick(self.value), value_coarse=pick(self.value_coarse), key_heads=pick(self.key_heads),
                       value_heads=pick(self.value_heads), value_coarse_heads=pick(self.value_coarse_heads),
                       clip=tuple(c for c in self.clip if c[1] in widths))

    def predicted_loss(self, bits_k, bits_v, groups_v=()) -> float:
        """Summed prediction (additive across layers and sides) for one allocation;
        `groups_v` (policy.groups_v) picks value_coarse where a layer uses coarse_group."""
        idx = {w: j for j, w in enumerate(self.widths)}
        total = 0.0
        for i, (bk, bv) in enumerate(zip(bits_k, bits_v)):
            coarse = bool(groups_v) and groups_v[i] == self.coarse_group
            total += 0.0 if bk == 16 else self.key[i][idx[bk]]
            total += 0.0 if bv == 16 else (self.value_coarse if coarse else self.value)[i][idx[bv]]
        return total


def policy_loss(sens: Sensitivity, policy, num_kv_heads: int) -> float:
    """`sens.predicted_loss` of a CachePolicy's widths: per KV head (`sens.per_head()`) when
    the policy splits layers into units, else per layer."""
    if policy.units:
        return sens.per_head().predicted_loss(*policy.head_widths(num_kv_heads))
    return sens.predicted_loss(policy.bits_k, policy.bits_v, policy.groups_v)


@dataclass(frozen=True)
class Allocation:
    bits_k: tuple[int, ...]
    bits_v: tuple[int, ...]
    target: float
    predicted_loss: float  # nats/token, summed over layers and sides
    groups_v: tuple[int, ...] = ()  # policy.groups_v; () when groups were not chosen

    @property
    def average_bits(self) -> float:
        bits = self.bits_k + self.bits_v
        return sum(bits) / len(bits)


def allocate(sens: Sensitivity, target: float, group: int | None = None,
             fine_cost: float = 0.0) -> Allocation:
    """Widths per layer for K and V with average <= target and least predicted loss
    (exact dynamic program over the integer bit budget).

    With `sens.value_coarse` and `group` (the policy's value group), each value side also
    chooses its scale/zero grouping: the policy's `group`, or `sens.coarse_group`, which
    saves `fine_cost` bits per element of metadata. The budget stays the bytes of
    `target`-bit codes at `group` (what `--bits` promises); the metadata saved where the
    coarse group costs little buys wider codes elsewhere, so metadata has to earn its bits
    against code bits."""
    n_layers, widths = sens.num_layers, sens.widths
    lo = min(widths)
    if not lo <= target:
        raise PolicyError(f"average bits {target} is below the smallest width {lo}")
    choose_groups = bool(sens.value_coarse) and group is not None and group != sens.coarse_group
    # Costs in integer units: 1/scale bits (fine_cost is a multiple of 1/scale).
    scale = 1
    if choose_groups:
        scale = next((q for q in (1, 2, 4, 8, 16, 32) if abs(fine_cost * q - round(fine_cost * q)) < 1e-9), None)
        if scale is None or fine_cost < 0:
            raise PolicyError(f"metadata cost {fine_cost} bits is not a multiple of 1/32")
    extra = round(fine_cost * scale)
    # Options per item: (cost, loss, width, group). Keys: one per width.
    items = [[(w * scale, sens.key[i][j], w, None) for j, w in enumerate(widths)] for i in range(n_layers)]
    for i in range(n_layers):
        opts = [(w * scale + (extra if choose_groups else 0), sens.value[i][j], w, group)
                for j, w in enumerate(widths)]
        if choose_groups:
            opts += [(w * scale, sens.value_coarse[i][j], w, sens.coarse_group) for j, w in enumerate(widths)]
        items.append(opts)
    budget = int(math.floor(target * scale * len(items) + 1e-9)) + (extra * n_layers if choose_groups else 0)
    budget = min(budget, sum(max(o[0] for o in opts) for opts in items))
    inf = float("inf")
    # best[c]: least loss of the items so far with total cost exactly c.
    best = [inf] * (budget + 1)
    best[0] = 0.0
    choice: list[list[int]] = []
    for opts in items:
        nxt, pick = [inf] * (budget + 1), [-1] * (budget + 1)
        for c, base in enumerate(best):
            if base == inf:
                continue
            for j, (cost, loss, _, _) in enumerate(opts):
                c2 = c + cost
                # Ties go to the later option, the wider code: equal predicted loss, less
                # actual risk.
                if c2 <= budget and base + loss <= nxt[c2]:
                    nxt[c2], pick[c2] = base + loss, j
        best = nxt
        choice.append(pick)
    c = min(range(budget + 1), key=lambda x: (best[x], -x))
    loss = best[c]
    chosen = []
    for opts, pick in zip(reversed(items), reversed(choice)):
        j = pick[c]
        chosen.append(opts[j])
        c -= opts[j][0]
    chosen.reverse()
    bits = tuple(o[2] for o in chosen)
    groups = tuple(o[3] for o in chosen[n_layers:]) if choose_groups else ()
    return Allocation(bits[:n_layers], bits[n_layers:], float(target), float(loss), groups)


def uniform_pair(target: float) -> tuple[int, int]:
    """The uniform comparison for a target: K=V=target when it is a width, else keys one
    step up (keys are the sensitive side), e.g. 2.5 -> K3/V2."""
    if float(target).is_integer() and int(target) in WIDTHS + (16,):
        return int(target), int(target)
    below = max(w for w in WIDTHS if w < target)
    above = min(w for w in WIDTHS if w > target)
    if not math.isclose((below + above) / 2, target):
        raise PolicyError(f"no uniform K/V pair averages {target} bits")
    return above, below


def shrink(sens: Sensitivity, alpha: float) -> Sensitivity:
    """Each layer's loss curve pulled toward its side's geometric-mean curve: log s' =
    mean + alpha * (log s - mean), per side and width. alpha 1 keeps the measurement, 0
    makes every layer alike (the knapsack then allocates uniformly). Why: the per-layer
    estimates are noisy, and where the true sensitivities are flat (the Hadamard rotation
    makes them so) the knapsack spends low widths on that noise (BENCHMARKS.md)."""
    tiny = 1e-12

    def side(rows: tuple[tuple[float, ...], ...]) -> tuple[tuple[float, ...], ...]:
        logs = [[math.log(max(x, tiny)) for x in r] for r in rows]
        mean = [sum(col) / len(col) for col in zip(*logs)]
        return tuple(tuple(math.exp(m + alpha * (x - m)) for x, m in zip(r, mean)) for r in logs)

    return replace(sens, key=side(sens.key), value=side(sens.value),
                   value_coarse=side(sens.value_coarse) if sens.value_coarse else (),
                   meta={**sens.meta, "shrink": alpha})


def average_for_fp16_ratio(base, shape, ratio: float) -> float:
    """The largest average code width (whole bits summed over the 2L sides) whose whole
    cache -- sinks, ring with scale/zero, residual -- is at most `ratio` times the same
    geometry in fp16. `base` (a CachePolicy) fixes the geometry; bytes are affine in the
    summed widths (metadata does not depend on the width), so two uniform policies give
    the line. Raises PolicyError when not even 1 bit everywhere fits."""
    n = base.num_layers
    sides = 2 * n
    lo, hi = min(WIDTHS), max(WIDTHS)
    at = {w: replace(base, bits_k=(w,) * n, bits_v=(w,) * n).total_bytes(shape) for w in (lo, hi)}
    per_width = (at[hi] - at[lo]) / ((hi - lo) * sides)  # bytes per unit of summed width
    fp16 = base.fp16_equivalent().total_bytes(shape)
    budget = ratio * fp16
    if budget < at[lo]:
        raise PolicyError(f"a cache of {ratio:g}x fp16 is below what {lo} bit everywhere needs at this "
                          f"geometry ({at[lo] / fp16:.3f}x: sinks, "
                          f"residual and scale/zero are fixed); raise the ratio or shrink the residual")
    summed = min(lo * sides + math.floor((budget - at[lo]) / per_width + 1e-9), hi * sides)
    return summed / sides
