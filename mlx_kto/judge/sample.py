"""The one sampler of the project (the demo, the judge's probes and `compare`), the one
prompt-to-token-ids helper (those and `generate`), and the held-out prompt sets.

`sample_replies` draws `n` replies per prompt: the n rows of a prompt (and of every other
prompt with the same token length, or of any length with `left_pad`) decode together in
one batch with a KV cache. At each sampled position it also measures the entropy of the
model's next-token distribution (temperature 1, whatever the sampling temperature), which
is how sure the model is of its own continuations; a collapsing model's entropy falls
towards 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.data.rows import find_split_files, load_examples
from mlx_kto.data.tokenize import _as_ids, chat_prompt_ids, has_chat_template
from mlx_kto.errors import UserError
from mlx_kto.judge.diversity import diversity_summary
from mlx_kto.judge.files import read_text
from mlx_kto.model.chat_template import FLAG_HINT

import mlx.core as mx
import mlx.nn as nn
import numpy as np


@dataclass
class Sample:
    text: str  # decoded reply (stop token excluded)
    tokens: list[int]  # generated ids before the stop token
    entropy_sum: float  # sum over sampled positions of H(p(. | context)), nats
    positions: int  # positions measured: len(tokens), +1 when a stop token was drawn


@dataclass
class Prompt:
    """One held-out prompt: text (standard) or a message list (conversational)."""

    prompt: str | list[dict]
    where: str = ""
    raw: bool = False  # a standard training-data prompt: encode as is (as training did)

    @property
    def text(self) -> str:
        """Plain text of the prompt (for a chat prompt, its last user message)."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m.get("content", "") for m in self.prompt if m.get("role") == "user"]
        return str(users[-1] if users else self.prompt[-1].get("content", ""))


def prompt_ids(
    tokenizer,
    prompt: str | list[dict],
    system_prompt: str | None = None,
    chat: bool = True,
    log: Callable[[str], None] | None = None,
    *,
    raw: bool = False,
    where: str = "prompt",
) -> list[int]:
    """Token ids that end where the reply starts. A message list, or with `chat` a text as
    one user turn (after `system_prompt`), goes through the chat template with the
    generation prompt, rendered as training renders prompts (`chat_prompt_ids`); a `raw`
    text (a standard training prompt), or any text without `chat` or without a template
    (`log` gets a note), is encoded as is."""
    templated = has_chat_template(tokenizer)
    if isinstance(prompt, str):
        if chat and not raw and templated:
            messages = [{"role": "user", "content": prompt}]
        else:
            if chat and not raw and log is not None:
                log(f"note: the tokenizer has no chat template, so the prompt is used as raw "
                    f"text; {FLAG_HINT}")  # fmt: skip
            if system_prompt:
                raise UserError(
                    f"system-prompt: needs a chat template (the raw prompt has no system turn); "
                    f"{FLAG_HINT}"
                )
            return _as_ids(tokenizer.encode(prompt))
    else:
        if not templated:
            raise UserError(f"{where}: a chat prompt, but the tokenizer has no chat template")
        messages = list(prompt)
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}, *messages]
    try:
        return chat_prompt_ids(tokenizer, messages)
    except Exception as e:  # jinja errors in a template: the prompt, one line
        msg = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{where}: the chat template failed ({type(e).__name__}: {msg})") from None


def check_sampling(
    temp: float = 1.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    max_tokens: int = 1,
    seed: int | None = 0,
) -> None:
    """Refuse sampling settings out of range, naming the flag, before anything is loaded
    (a negative temperature would otherwise be recorded, NaN would sample garbage)."""
    if not (math.isfinite(temp) and temp >= 0):
        raise UserError(f"--temp: must be a finite number >= 0 (0 = greedy), got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be in (0, 1] (1 = off), got {top_p}")
    if not 0 <= min_p <= 1:
        raise UserError(f"--min-p: must be in [0, 1] (0 = off), got {min_p}")
    if top_k < 0:
        raise UserError(f"--top-k: must be >= 0 (0 = off), got {top_k}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens: must be >= 1, got {max_tokens}")
    if seed is not None and not 0 <= seed < 2**64:
        raise UserError(f"--seed: must be in [0, 2**64), got {seed}")


def token_entropy(logits: mx.array) -> mx.array:
    """H(p) = -sum_v p_v log p_v in nats, p = softmax(logits), per row: [B, V] -> [B]."""
    logp = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32), -1, keepdims=True)
    return -(mx.exp(logp) * logp).sum(-1)


def sample_replies(
    model: nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    n: int = 4,
    max_tokens: int = 64,
    temp: float = 1.0,
    seed: int = 0,
    *,
    max_rows: int = 64,
    left_pad: bool = False,
) -> list[list[Sample]]:
    """`n` sampled replies per prompt (token-id lists), as `Sample`s, in prompt order.

    Rows decode in batches of up to `max_rows`: prompts of one token length each, or with
    `left_pad` prompts of any length left-padded (mlx-lm's BatchKVCache masks the padding
    and starts each row's positions at 0): one decode pass instead of one per prompt
    length, which on the CPU (a decode step costs about the same for 1 row as for 100)
    is most of the time. Deterministic for a seed: the keys derive from it, never from the
    global random state (so sampling in the middle of training leaves the run's dropout
    sequence alone), and the same prompts get the same keys whatever the model, so two
    models are compared on the same draws. Runs in eval mode and restores the mode."""
    from mlx_lm.models.cache import BatchKVCache, make_prompt_cache  # imports transformers

    stops = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    was_training = model.training
    model.eval()
    jobs = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
    jobs.sort(key=lambda j: len(j[1]))  # stable: equal lengths stay together
    out: list[list[Sample]] = [[] for _ in prompt_ids]
    key = mx.random.key(seed)
    start = 0
    try:
        while start < len(jobs):
            length, end = len(jobs[start][1]), start
            while end < len(jobs) and end - start < max_rows:
                if not left_pad and len(jobs[end][1]) != length:
                    break
                end += 1
            chunk, start = jobs[start:end], end
            key, sub = mx.random.split(key)
            width = max(len(ids) for _, ids in chunk)
            pads = [width - len(ids) for _, ids in chunk]
            rows = [[0] * pad + ids for pad, (_, ids) in zip(pads, chunk)]  # [B, width]
            cache = (
                [BatchKVCache(pads) for _ in model.layers] if left_pad else make_prompt_cache(model)
            )
            for (i, _), s in zip(chunk, _decode(model, cache, rows, stops, max_tokens, temp, sub)):
                s.text = tokenizer.decode(s.tokens)
                out[i].append(s)
    finally:
        model.train(was_training)
    return out


def _decode(model, cache, rows, stops: set, max_tokens: int, temp: float, key) -> list[Sample]:
    """Sample up to max_tokens after equal-width prompt rows, stopping each row at a stop
    token; entropy is summed over the positions each row sampled."""
    if not rows[0]:
        raise UserError("a prompt encoded to no tokens")
    B = len(rows)
    logits = model(mx.array(rows, dtype=mx.int32), cache=cache)[:, -1, :]  # [B, V]
    toks = np.zeros((B, max_tokens), dtype=np.int64)  # [B, max_tokens]
    ent = np.zeros(B, dtype=np.float64)
    pos = np.zeros(B, dtype=np.int64)
    lengths = np.full(B, max_tokens)
    done = np.zeros(B, dtype=bool)
    stop_arr = np.array(sorted(stops), dtype=np.int64)
    for t in range(max_tokens):
        key, sub = mx.random.split(key)
        if temp <= 0:
            nxt = mx.argmax(logits, axis=-1)
        else:
            nxt = mx.random.categorical(logits.astype(mx.float32) / temp, key=sub)  # [B]
        h = token_entropy(logits)
        mx.eval(nxt, h)
        nxt_np, h_np = np.array(nxt), np.array(h, dtype=np.float64)
        live = ~done
        ent[live] += h_np[live]
        pos[live] += 1
        toks[:, t] = nxt_np
        newly = live & np.isin(nxt_np, stop_arr)
        lengths[newly] = t
        done |= newly
        if done.all():
            break
        logits = model(nxt[:, None].astype(mx.int32), cache=cache)[:, -1, :]
    return [
        Sample("", toks[b, : lengths[b]].tolist(), float(ent[b]), int(pos[b])) for b in range(B)
    ]


def summarize(samples: list[list[Sample]]) -> dict:
    """Diversity figures of a sample set (see `diversity.diversity_summary`)."""
    flat = [s for per in samples for s in per]
    return diversity_summary(
        [[s.text for s in per] for per in samples],
        entropy_sum=sum(s.entropy_sum for s in flat),
        entropy_count=sum(s.positions for s in flat),
        reply_tokens=[len(s.tokens) for s in flat],
    )


# ---------------------------------------------------------------------------
# prompt sets


def _dedupe(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    seen, out = set(), []
    for p in prompts:
        k = json.dumps(p.prompt, sort_keys=True)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out[:limit] if limit else out


def prompts_from_examples(examples, limit: int | None = None) -> list[Prompt]:
    """The distinct prompts of feedback rows (data.Example), in file order."""
    return _dedupe([Prompt(e.prompt, e.where, raw=not e.conversational) for e in examples], limit)


def _prompt_of_row(row, where: str) -> Prompt:
    if isinstance(row, str):
        return Prompt(row, where)
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with 'prompt' or 'messages', or a string")
    value = row.get("prompt", row.get("messages"))
    if isinstance(value, str) and value.strip():
        return Prompt(value, where)
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        msgs = list(value)
        if "prompt" not in row and msgs[-1].get("role") == "assistant":
            msgs = msgs[:-1]  # a chat log: prompt = everything before the last reply
        if msgs:
            return Prompt(msgs, where)
    raise UserError(f"{where}: no usable 'prompt' or 'messages' (a string or a message list)")


def _is_feedback(row) -> bool:
    return isinstance(row, dict) and ("label" in row or "chosen" in row)


def load_prompts(
    path: str | Path, split: str | None = None, limit: int | None = None
) -> tuple[list[Prompt], str]:
    """The held-out prompt set of `path` and a description of where it came from:

    - a data folder: the prompts of `split` (default: test, else valid);
    - a feedback file (rows with a label, or chosen/rejected): its prompts;
    - a prompts file: .jsonl / .json rows with "prompt" (text or messages) or "messages"
      (a trailing assistant turn is dropped), or any other file: one prompt per line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        files = find_split_files(path)
        choice = split or next((s for s in ("test", "valid") if s in files), None)
        if choice is None:
            raise UserError(
                f"{path}: no valid.jsonl or test.jsonl to take held-out prompts from "
                "(pass a prompts file, or --split train)"
            )
        if choice not in files:
            raise UserError(f"split: '{choice}' not found in {path}")
        return prompts_from_examples(load_examples(files[choice]), limit), f"{files[choice]}"
    text = read_text(path)
    rows: list[tuple[object, str]] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((json.loads(line), f"{path}:{i}"))
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        data = data.get("data", data) if isinstance(data, dict) else data
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a list of prompts")
        rows = [(r, f"{path}[{i}]") for i, r in enumerate(data)]
    else:
        rows = [
            (line, f"{path}:{i}") for i, line in enumerate(text.splitlines(), 1) if line.strip()
        ]
    if not rows:
        raise UserError(f"{path}: no prompts in this file")
    if any(_is_feedback(r) for r, _ in rows):
        return prompts_from_examples(load_examples(path), limit), str(path)
    return _dedupe([_prompt_of_row(r, w) for r, w in rows], limit), str(path)
