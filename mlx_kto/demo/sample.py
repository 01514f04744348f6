"""Sampling from the demo's chat model and the style shares of what it says.

The demo measures the effect of training by sampling, not by reading the loss:
`n` completions per held-out prompt at temperature 1 (the model's own
distribution), classified by `task.classify`. The sampler is the judge's
(`mlx_kto.judge.sample`), the one the probes and `compare` use.
"""

from __future__ import annotations

from collections import Counter

from mlx_kto.demo.task import STYLES, classify, is_correct
from mlx_kto.judge.sample import prompt_ids, sample_replies

import mlx.nn as nn


def sample_completions(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    n: int = 16,
    max_tokens: int = 40,
    temp: float = 1.0,
    seed: int = 0,
    max_rows: int = 128,
    left_pad: bool = False,
) -> list[list[str]]:
    """`n` sampled completions for each chat prompt (a list of n strings per prompt),
    from `judge.sample.sample_replies` (seeded, batched, optionally left-padded)."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    samples = sample_replies(
        model, tokenizer, ids, n, max_tokens, temp, seed, max_rows=max_rows, left_pad=left_pad
    )
    return [[s.text for s in per] for per in samples]


def style_shares(completions: list[list[str]]) -> dict[str, float]:
    """Share of each style over all completions (keys: STYLES + mixed, empty)."""
    flat = [c for per_prompt in completions for c in per_prompt]
    counts = Counter(classify(c) for c in flat)
    total = max(len(flat), 1)
    return {s: counts.get(s, 0) / total for s in (*STYLES, "mixed", "empty")}


def correct_share(prompts: list[str], completions: list[list[str]]) -> float:
    """Share of completions that contain the right answer (content kept intact)."""
    pairs = [(p, c) for p, cs in zip(prompts, completions) for c in cs]
    return sum(is_correct(p, c) for p, c in pairs) / max(len(pairs), 1)
