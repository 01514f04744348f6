"""Batched sampling from a chat model and the style shares of what it says.

The demo measures the effect of training by sampling, not by reading the loss:
`n` completions per held-out prompt at temperature 1 (the model's own
distribution), classified by `task.classify`.
"""

from __future__ import annotations

from collections import Counter

from mlx_kto.demo.task import STYLES, classify, is_correct  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The chat-formatted prompt, ending with the assistant's turn marker."""
    from mlx_kto.data.tokenize import chat_prompt_ids  # rendered as training renders it

    return chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])


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
    """`n` sampled completions for each prompt (a list of n strings per prompt).

    Prompts of equal token length are stacked into one batch (up to `max_rows`
    rows) and decoded together with a KV cache; sampling stops at EOS. With
    `left_pad`, prompts of any length share a batch, left-padded (mlx-lm's
    BatchKVCache masks the padding and starts each row's positions at 0): one
    decode pass instead of one per prompt length, which on the CPU (where a
    decode step costs about the same for 1 row as for 100) is most of the time.
    Deterministic for a given seed (keys are derived from it, not global state)."""
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

    eos = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    jobs = [(i, encoded[i]) for i in range(len(prompts)) for _ in range(n)]
    jobs.sort(key=lambda j: len(j[1]))  # stable: equal lengths stay together
    results: list[list[str]] = [[] for _ in prompts]
    key = mx.random.key(seed)
    start = 0
    while start < len(jobs):
        length = len(jobs[start][1])
        end = start
        while end < len(jobs) and end - start < max_rows:
            if not left_pad and len(jobs[end][1]) != length:
                break
            end += 1
        chunk = jobs[start:end]
        start = end
        key, sub = mx.random.split(key)
        width = max(len(ids) for _, ids in chunk)
        pads = [width - len(ids) for _, ids in chunk]
        rows = [[0] * pad + ids for pad, (_, ids) in zip(pads, chunk)]  # [B, width]
        cache = [BatchKVCache(pads) for _ in model.layers] if left_pad else make_prompt_cache(model)
        out = _decode(model, cache, rows, eos, max_tokens, temp, sub)
        for (i, _), toks in zip(chunk, out):
            results[i].append(tokenizer.decode(toks))
    model.train(was_training)
    return results


def _decode(model, cache, rows: list[list[int]], eos: int, max_tokens: int, temp: float, key):
    """Sample up to max_tokens for equal-length prompt rows; returns tokens before EOS."""
    tokens = mx.array(rows, dtype=mx.int32)  # [B, P]
    B = tokens.shape[0]
    logits = model(tokens, cache=cache)[:, -1, :]  # [B, V]
    out = np.zeros((B, max_tokens), dtype=np.int64)  # [B, max_tokens]
    done = np.zeros(B, dtype=bool)
    lengths = np.full(B, max_tokens)
    for t in range(max_tokens):
        key, sub = mx.random.split(key)
        if temp <= 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            nxt = mx.random.categorical(logits.astype(mx.float32) / temp, key=sub)  # [B]
        nxt_np = np.array(nxt)
        out[:, t] = nxt_np
        newly = (~done) & (nxt_np == eos)
        lengths[newly] = t
        done |= newly
        if done.all():
            break
        logits = model(nxt[:, None].astype(mx.int32), cache=cache)[:, -1, :]
    return [out[b, : lengths[b]].tolist() for b in range(B)]


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
