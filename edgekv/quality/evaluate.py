"""`edgekv eval`: perplexity and passkey through the compressed cache, for several cache
settings of one model, with the fp16 cache of the same window as the reference row."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from edgekv.policy import CachePolicy
from edgekv.quality.passkey import passkey
from edgekv.quality.divergence import divergence
from edgekv.quality.perplexity import perplexity


@dataclass
class EvalSetting:
    bits_k: int
    bits_v: int
    window: int | None
    sinks: int
    block: int
    group: int
    positions: str = "cache"
    rotation: str = "none"
    meta: str = "fp16"
    residual: str = "fp16"  # sinks/residual storage of quantized settings (CachePolicy.residual)
    clip: bool = True  # calibrated settings: calibrate range clipping too (edgekv.clipping)
    feedback: bool = True  # calibrated settings: round keys query-aware (edgekv.key_feedback)
    value_groups: bool = False  # calibrated settings: value group G or 2G per layer (policy.groups_v)
    head_widths: bool = False  # calibrated settings: widths per KV head are a candidate (policy.units)
    calibrated: float | None = None  # average code width: per-layer bits from calibration
    kv_ratio: float | None = None  # instead: the widest calibrated average within this x fp16

    @property
    def label(self) -> str:
        w = "full" if self.window is None else f"W{self.window}"
        if self.rotation != "none" and not self.bits_k == self.bits_v == 16:
            w += f" {self.rotation}"
        if self.meta != "fp16" and not self.bits_k == self.bits_v == 16:
            w += f" meta {self.meta}"
        if self.residual != "fp16" and not self.bits_k == self.bits_v == 16:
            w += f" residual {self.residual}"
        if self.calibrated is not None or self.kv_ratio is not None:
            what = f"{self.calibrated:g}-bit" if self.kv_ratio is None else f"{self.kv_ratio:g}x fp16"
            return (f"calibrated {what} {w}" + ("" if self.clip else " min/max")
                    + ("" if self.feedback else " nearest") + (" value groups" if self.value_groups else "")
                    + (" per head" if self.head_widths else ""))
        kv = "fp16" if self.bits_k == self.bits_v == 16 else (
            f"{self.bits_k}-bit" if self.bits_k == self.bits_v else f"K{self.bits_k}/V{self.bits_v}")
        return f"{kv} {w}"

    def geometry(self) -> tuple:
        return (self.window, self.sinks, self.block, self.group, self.positions, self.rotation, self.meta,
                self.residual, self.clip, self.feedback, self.value_groups, self.head_widths)

    def policy(self, num_layers: int) -> CachePolicy:
        """The cache policy; for a calibrated setting, its geometry with the base widths
        (the bits come from `calibrated_setting`). The fp16 setting keeps fp16 sinks and
        residual: it is the baseline."""
        fp16 = self.bits_k == self.bits_v == 16
        common = dict(window=self.window, sinks=self.sinks, block=self.block, group=self.group,
                      positions=self.positions, rotation=self.rotation, meta=self.meta,
                      residual="fp16" if fp16 else self.residual)
        return CachePolicy.uniform(num_layers, bits_k=self.bits_k, bits_v=self.bits_v, **common)


@dataclass
class EvalRow:
    setting: str
    bits_k: int | list[int]  # a list: per layer (calibrated)
    bits_v: int | list[int]
    window: int | None
    sinks: int
    block: int
    group: int
    ppl: float
    delta_pct: float | None  # vs the fp16 cache with the same window
    passkey_pct: float | None
    kv_bytes_per_token: float
    fp16_ratio: float
    kv_bytes: int  # whole cache at full window (or at the evaluated context without one)
    seconds: float
    passkey_trials: list = field(default_factory=list)
    average_bits: float = 16.0  # mean code width over layers x {K, V}
    bits_per_element: float = 16.0  # ring bits per element, scale/zero included
    predicted_delta_pct: float | None = None  # calibration's prediction (when calibrated)
    kl: float | None = None  # mean KL(fp16 cache || this cache), nats/token (quantized rows)
    delta_pct_se: float | None = None  # standard error of delta_pct, points (quantized rows)
    block_delta_nll: list = field(default_factory=list)  # per scored block: sum of NLL - fp16's NLL
    block_tokens: list = field(default_factory=list)  # per scored block: tokens (divergence.py)
    clip: list = field(default_factory=list)  # (side, width, ratio) range clipping (policy.clip)
    key_rounding: str = "nearest"  # or "feedback" (policy.key_feedback)
    groups_v: list = field(default_factory=list)  # per-layer value groups (policy.groups_v; []: all `group`)


def run_eval(model, tokenizer, settings: list[EvalSetting], text: str, max_tokens: int,
             sequences: int, passkey_lengths: list[int], passkey_depths: list[float],
             progress=None) -> list[EvalRow]:
    """Evaluate every setting; rows come back in the order given. `progress(n)` is called
    with tokens processed. Calibrated settings are allocated from one calibration per
    cache geometry (on the calibration text, never `text`); `run_eval.calibration`
    holds what it measured."""
    import math

    from edgekv.allocation import policy_loss
    from edgekv.reference.model import ReferenceModel, kv_shape

    ids = tokenizer(text).input_ids[:max_tokens]
    shape = kv_shape(model.config)
    rows, sens, done = [], {}, []
    run_eval.calibration = {}
    for s in settings:
        sens_used = None
        policy = s.policy(shape.num_layers)
        if s.kv_ratio is not None:  # the model's shape decides what fits
            from edgekv.allocation import average_for_fp16_ratio

            s = replace(s, calibrated=average_for_fp16_ratio(policy, shape, s.kv_ratio))
        if s.calibrated is not None:
            policy, sens_used = calibrated_setting(model, tokenizer, s, shape.num_layers, sens)
            run_eval.calibration[s.label] = sens_used.meta
        ref = ReferenceModel(model, policy)
        t0 = time.perf_counter()
        kl, d = None, None
        if policy.average_bits() < 16:  # in lockstep with the fp16 cache of the same geometry
            fp16 = ReferenceModel(model, policy.fp16_equivalent())
            d = divergence(fp16, ref, ids, sequences=sequences, progress=progress)
            ppl, kl = d.ppl_test, d.kl
        else:
            ppl = perplexity(ref, ids, sequences=sequences, progress=progress).ppl
        trials = passkey(ref, tokenizer, passkey_lengths, passkey_depths,
                         progress=progress)
        secs = time.perf_counter() - t0
        context = len(ids) // sequences
        predicted = None
        if sens_used is not None:
            predicted = 100.0 * math.expm1(policy_loss(sens_used, policy, shape.num_kv_heads))
        per_layer = s.calibrated is not None
        rows.append(EvalRow(
            setting=s.label, bits_k=list(policy.bits_k) if per_layer else s.bits_k,
            bits_v=list(policy.bits_v) if per_layer else s.bits_v, window=s.window, sinks=s.sinks,
            block=s.block, group=s.group, ppl=ppl, delta_pct=None,
            passkey_pct=100.0 * sum(t.found for t in trials) / len(trials) if trials else None,
            kv_bytes_per_token=policy.ring_bytes_per_token(shape),
            fp16_ratio=policy.fp16_ratio(shape, context),
            kv_bytes=policy.total_bytes(shape, context), seconds=secs,
            passkey_trials=[asdict(t) for t in trials], average_bits=policy.average_bits(),
            bits_per_element=policy.bits_per_element(shape), predicted_delta_pct=predicted, kl=kl,
            clip=[list(c) for c in policy.clip],
            key_rounding="nearest" if policy.key_feedback is None else "feedback",
            groups_v=list(policy.groups_v),
            delta_pct_se=None if d is None else d.delta_pct_se,
            block_delta_nll=[] if d is None else d.block_delta_nll,
            block_tokens=[] if d is None else d.block_tokens))
        done.append((s, policy))
    # The calibration's prediction for uniform rows too, to check it against the truth (only
    # where they quantize as it was measured: same ratios, same key rounding).
    for (s, policy), row in zip(done, rows):
        g = s.geometry()
        if row.predicted_delta_pct is None and g in sens and policy.average_bits() < 16 \
                and (policy.clip, policy.key_feedback) == (sens[g].clip, sens[g].key_feedback):
            row.predicted_delta_pct = 100.0 * math.expm1(policy_loss(sens[g], policy, shape.num_kv_heads))
    _fill_deltas(rows)
    return rows


def calibrated_setting(model, tokenizer, s: EvalSetting, num_layers: int, memo: dict):
    """(policy, Sensitivity) for a calibrated setting, chosen exactly as `edgekv export`
    chooses it (calibration.calibrated_policy); one sensitivity measurement per geometry."""
    from edgekv.calibration import calibrated_policy, coarse_group, measure
    from edgekv.clipping import candidates

    key = s.geometry()
    if key not in memo:
        base = s.policy(num_layers)
        memo[key] = measure(model, tokenizer, base, clips=candidates(s.clip), feedback=s.feedback,
                            coarse_group=coarse_group(base, model, s.value_groups), heads=s.head_widths)
    policy, _ = calibrated_policy(model, tokenizer, s.policy(num_layers), s.calibrated, sens=memo[key],
                                  value_groups=s.value_groups, per_head=s.head_widths)
    return policy, memo[key]


def _fill_deltas(rows: list[EvalRow]) -> None:
    """Delta to the fp16 row with the same window, sinks and block, when there is one."""
    for r in rows:
        for b in rows:
            if (b.bits_k == b.bits_v == 16 and b.window == r.window and b.sinks == r.sinks
                    and b.block == r.block):
                r.delta_pct = 100.0 * (r.ppl / b.ppl - 1.0)
