"""KL divergence of a compressed cache's next-token distributions from the fp16 cache's.

Perplexity deltas of a few tenths of a percent are partly luck: quantization noise lowers
the loss on some tokens and raises it on others, and over a few thousand tokens the sum
moves by as much as the methods being compared (BENCHMARKS.md, "accuracy methods"). The
mean KL(p_fp16 || p_cache) over the same tokens counts every change in the distribution as
damage, so it ranks close settings far more stably (llama.cpp's quantization reports use
it for the same reason). Both models run in lockstep over the same chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgekv.quality.perplexity import scored_chunks
from edgekv.reference.model import ReferenceModel


@dataclass
class DivergenceResult:
    kl: float  # mean KL(reference || test) in nats per scored token
    ppl_reference: float
    ppl_test: float
    tokens_scored: int

    @property
    def delta_pct(self) -> float:
        return 100.0 * (self.ppl_test / self.ppl_reference - 1.0)


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
    nll_ref, count = 0.0, 0
    for chunk, targets in scored_chunks(ids, sequences, step):
        targets = targets.unsqueeze(-1)
        lp_ref = torch.log_softmax(reference.forward(chunk, ref_cache)[:, : targets.shape[1]], -1)
        nll_ref -= float(lp_ref.gather(-1, targets).sum())
        p_ref = lp_ref.exp()
        for i, (m, c) in enumerate(zip(tests, caches)):
            lp = torch.log_softmax(m.forward(chunk, c)[:, : targets.shape[1]], -1)
            kl[i] += float((p_ref * (lp_ref - lp)).sum())
            nll[i] -= float(lp.gather(-1, targets).sum())
        count += targets.numel()
        if progress is not None:
            progress(chunk.shape[1] * len(tests))
    return [DivergenceResult(k / count, math.exp(nll_ref / count), math.exp(v / count), count)
            for k, v in zip(kl, nll)]
