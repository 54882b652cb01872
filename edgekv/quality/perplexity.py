"""Perplexity computed through the compressed cache.

Every token's logits come from a forward that reads all earlier tokens from the cache
(sinks fp16, ring quantized and evicting, residual fp16), never from a full-attention
pass. Tokens are fed in block-aligned segments, which is exactly token-by-token decoding
under this cache (see ReferenceModel). Independent sequences may be batched for speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from edgekv.reference.model import ReferenceModel


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens_scored: int


def scored_chunks(ids: list[int], sequences: int, step: int):
    """Split `ids` into `sequences` equal independent sequences and yield, chunk by chunk,
    (input chunk [S, <=step], its targets [S, <=step]): logits at position i predict token
    i+1, so a chunk's last logit predicts the next chunk's first token and each sequence's
    first token is never scored."""
    n = len(ids) // sequences
    if n < 2:
        raise ValueError(f"{len(ids)} tokens are too few for {sequences} sequences")
    x = torch.tensor(ids[: n * sequences]).view(sequences, n)
    for start in range(0, n, step):
        yield x[:, start:start + step], x[:, start + 1:start + 1 + step]


def perplexity(model: ReferenceModel, ids: list[int], sequences: int = 1,
               step: int = 256, progress=None) -> PerplexityResult:
    """Split `ids` into `sequences` equal independent sequences, run each through its own
    cache, and return the perplexity of every token but each sequence's first."""
    cache = model.new_cache(batch=sequences, context=len(ids) // sequences)
    total, count = 0.0, 0
    for chunk, targets in scored_chunks(ids, sequences, step):
        logits = model.forward(chunk, cache)[:, : targets.shape[1]]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1))
        total -= float(lp.sum())
        count += targets.numel()
        if progress is not None:
            progress(chunk.shape[1])
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count)
