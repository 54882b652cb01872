"""Passkey retrieval: a 5-digit key hidden in filler text at a given depth and length.

The prompt is built to an exact token length, then decoded greedily through the cache.
Keys placed more than the window's reach before the question are evicted (sinks aside),
so those trials show what a sliding window loses; keys inside it show what quantization
costs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from edgekv.reference.model import ReferenceModel

INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str
    found: bool
    distance: int  # tokens between the needle and the end of the prompt


def build_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], int]:
    """Token ids of about `length` tokens with the needle at `depth` (0 = start, 1 = end),
    and the needle's distance in tokens from the end of the prompt."""
    enc = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    intro, needle, question, filler = enc(INTRO), enc(NEEDLE.format(key=key)), enc(QUESTION), enc(FILLER)
    budget = length - len(intro) - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt's fixed parts")
    hay = (filler * (budget // len(filler) + 1))[:budget]
    cut = int(round(depth * budget))
    ids = intro + hay[:cut] + needle + hay[cut:] + question
    return ids, len(ids) - len(intro) - cut


def run_trial(model: ReferenceModel, tokenizer, length: int, depth: float, key: str,
              new_tokens: int = 8) -> PasskeyTrial:
    ids, distance = build_prompt(tokenizer, length, depth, key)
    out = list(model.generate(torch.tensor([ids]), new_tokens))
    answer = tokenizer.decode(out)
    digits = "".join(re.findall(r"\d", answer))
    return PasskeyTrial(len(ids), depth, key, answer.strip(), digits.startswith(key), distance)


def passkey(model: ReferenceModel, tokenizer, lengths: list[int], depths: list[float],
            seed: int = 0, progress=None) -> list[PasskeyTrial]:
    rng = random.Random(seed)
    trials = []
    for length in lengths:
        for depth in depths:
            key = str(rng.randint(10000, 99999))
            trials.append(run_trial(model, tokenizer, length, depth, key))
            if progress is not None:
                progress(length)
    return trials
