"""`edgekv eval`: perplexity and passkey through the compressed cache, for several cache
settings of one model, with the fp16 cache of the same window as the reference row."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from edgekv.policy import CachePolicy
from edgekv.quality.passkey import passkey
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

    @property
    def label(self) -> str:
        w = "full" if self.window is None else f"W{self.window}"
        kv = "fp16" if self.bits_k == self.bits_v == 16 else (
            f"{self.bits_k}-bit" if self.bits_k == self.bits_v else f"K{self.bits_k}/V{self.bits_v}")
        return f"{kv} {w}"

    def policy(self, num_layers: int) -> CachePolicy:
        return CachePolicy.uniform(num_layers, bits_k=self.bits_k, bits_v=self.bits_v,
                                   window=self.window, sinks=self.sinks, block=self.block,
                                   group=self.group, positions=self.positions)


@dataclass
class EvalRow:
    setting: str
    bits_k: int
    bits_v: int
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


def run_eval(model, tokenizer, settings: list[EvalSetting], text: str, max_tokens: int,
             sequences: int, passkey_lengths: list[int], passkey_depths: list[float],
             progress=None) -> list[EvalRow]:
    """Evaluate every setting; rows come back in the order given. `progress(n)` is called
    with tokens processed."""
    from edgekv.reference.model import ReferenceModel, kv_shape

    ids = tokenizer(text).input_ids[:max_tokens]
    shape = kv_shape(model.config)
    rows = []
    for s in settings:
        policy = s.policy(shape.num_layers)
        ref = ReferenceModel(model, policy)
        t0 = time.perf_counter()
        ppl = perplexity(ref, ids, sequences=sequences, progress=progress)
        trials = passkey(ref, tokenizer, passkey_lengths, passkey_depths,
                         progress=progress)
        secs = time.perf_counter() - t0
        context = len(ids) // sequences
        rows.append(EvalRow(
            setting=s.label, bits_k=s.bits_k, bits_v=s.bits_v, window=s.window, sinks=s.sinks,
            block=s.block, group=s.group, ppl=ppl.ppl, delta_pct=None,
            passkey_pct=100.0 * sum(t.found for t in trials) / len(trials) if trials else None,
            kv_bytes_per_token=policy.ring_bytes_per_token(shape),
            fp16_ratio=policy.fp16_ratio(shape, context),
            kv_bytes=policy.total_bytes(shape, context), seconds=secs,
            passkey_trials=[asdict(t) for t in trials]))
    _fill_deltas(rows)
    return rows


def _fill_deltas(rows: list[EvalRow]) -> None:
    """Delta to the fp16 row with the same window, sinks and block, when there is one."""
    for r in rows:
        for b in rows:
            if (b.bits_k == b.bits_v == 16 and b.window == r.window and b.sinks == r.sinks
                    and b.block == r.block):
                r.delta_pct = 100.0 * (r.ppl / b.ppl - 1.0)
