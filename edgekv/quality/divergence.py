"""KL divergence of a compressed cache's next-token distributions from the fp16 cache's.

Perplexity deltas of a few tenths of a percent are partly luck: quantization noise lowers
the loss on some tokens and raises it on others, and over a few thousand tokens the sum
moves by as much as the methods being compared (BENCHMARKS.md, "accuracy methods"). The
mean KL(p_fp16 || p_cache) over the same tokens counts every change in the distribution as
damage, so it ranks close settings far more stably (llama.cpp's quantization reports use
it for the same reason). Both models run in lockstep over the same chunks.

How large that luck is gets measured too: every (chunk, sequence) block's summed NLL
difference is kept, and the standard error of Δppl comes from those block means (batch
means: blocks of `step` tokens are treated as independent draws, which they nearly are,
since a token's loss depends mostly on its own text). Two settings scored against the same
fp16 cache on the same tokens can be compared pairwise from their blocks (`paired_se_pct`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from edgekv.quality.perplexity import scored_chunks
from edgekv.reference.model import ReferenceModel


@dataclass
class DivergenceResult:
    kl: float  # mean KL(reference || test) in nats per scored token
    ppl_reference: float
    ppl_test: float
    tokens_scored: int
    block_delta_nll: list[float] = field(default_factory=list)  # per block: sum of NLL(test) - NLL(ref)
    block_tokens: list[int] = field(default_factory=list)  # per block: tokens scored

    @property
    def delta_pct(self) -> float:
        return 100.0 * (self.ppl_test / self.ppl_reference - 1.0)

    @property
    def delta_pct_se(self) -> float:
        """Standard error of `delta_pct` in percentage points (batch means over the blocks)."""
        return delta_pct_se(self.block_delta_nll, self.block_tokens)


def delta_pct_se(block_delta_nll: list[float], block_tokens: list[int]) -> float:
    """Standard error, in percentage points, of 100 (exp(mean ΔNLL) - 1) where the mean is
    the ratio of the block sums to the block token counts (delta method on both)."""
    if len(block_tokens) < 2:
        return float("nan")
    return _batch_se(_linearised(block_delta_nll, block_tokens), block_tokens)


def _linearised(block_delta_nll, block_tokens) -> np.ndarray:
    """Each block's contribution to 100 (exp(mean ΔNLL) - 1), linearised about the mean
    (the delta method), before dividing by the total token count."""
    d = np.asarray(block_delta_nll, dtype=np.float64)
    n = np.asarray(block_tokens, dtype=np.float64)
    mean = d.sum() / n.sum()
    return math.exp(mean) * (d - mean * n)


def _batch_se(z: np.ndarray, block_tokens) -> float:
    """Batch-means standard error, in points, of a sum of per-block terms `z` over the tokens."""
    return 100.0 * math.sqrt(len(z) / (len(z) - 1) * float((z ** 2).sum())) / float(np.sum(block_tokens))


def paired_se_pct(a: DivergenceResult | dict, b: DivergenceResult | dict) -> float:
    """Standard error of delta_pct(a) - delta_pct(b) for two settings scored on the same
    blocks against the same reference: the shared part of their luck cancels."""
    get = (lambda r, k: r[k]) if isinstance(a, dict) else getattr
    ta, tb = get(a, "block_tokens"), get(b, "block_tokens")
    if list(ta) != list(tb):
        raise ValueError("the two results were not scored on the same blocks")
    return _batch_se(_linearised(get(a, "block_delta_nll"), ta) - _linearised(get(b, "block_delta_nll"), tb), ta)


def divergence(reference: ReferenceModel, test: ReferenceModel, ids: list[int], sequences: int = 1,
               step: int = 256, progress=None) -> DivergenceResult:
    """Split `ids` into `sequences` independent sequences and score every token but each
    sequence's first under both models' caches. `progress(n)`: as in `perplexity`."""
    return divergences(reference, [test], ids, sequences, step, progress)[0]


def divergences(reference: ReferenceModel, tests: list[ReferenceModel], ids: list[int],
                sequences: int = 1, step: int = 256, progress=None) -> list[DivergenceResult]:
    """`divergence` of several test models against one reference, which runs once."""
    n = len(ids) // sequences
    ref_cache = reference.new_cache(batch=sequences, context=n)
    caches = [m.new_cache(batch=sequences, context=n) for m in tests]
    kl = [0.0] * len(tests)
    nll = [0.0] * len(tests)
    blocks: list[list[float]] = [[] for _ in tests]
    block_tokens: list[int] = []
    nll_ref, count = 0.0, 0
    for chunk, targets in scored_chunks(ids, sequences, step):
        targets = targets.unsqueeze(-1)
        lp_ref = torch.log_softmax(reference.forward(chunk, ref_cache)[:, : targets.shape[1]], -1)
        tok_ref = lp_ref.gather(-1, targets)[..., 0].double()  # [S, T]
        nll_ref -= float(tok_ref.sum())
        p_ref = lp_ref.exp()
        for i, (m, c) in enumerate(zip(tests, caches)):
            lp = torch.log_softmax(m.forward(chunk, c)[:, : targets.shape[1]], -1)
            kl[i] += float((p_ref * (lp_ref - lp)).sum())
            tok = lp.gather(-1, targets)[..., 0].double()
            nll[i] -= float(tok.sum())
            blocks[i] += (tok_ref - tok).sum(1).tolist()  # one block per sequence
        block_tokens += [targets.shape[1]] * targets.shape[0]
        count += targets.numel()
        if progress is not None:
            progress(chunk.shape[1] * len(tests))
    return [DivergenceResult(k / count, math.exp(nll_ref / count), math.exp(v / count), count, b,
                             list(block_tokens)) for k, v, b in zip(kl, nll, blocks)]
