"""`mlx-kto generate`: sample from a base model with or without an adapter, with
mlx-lm's generate flags (system prompt, top-p / min-p / top-k, prompt from stdin) and
its speed figures (prompt and generation tokens per second, peak memory)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from mlx_kto.errors import UserError
from mlx_kto.model.chat_template import FLAG_HINT


@dataclass
class GenerationStats:
    prompt_tokens: int
    prompt_tps: float  # prompt tokens per second (prefill)
    generation_tokens: int
    generation_tps: float  # generated tokens per second
    peak_memory_gb: float

    def lines(self) -> list[str]:
        return [
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tokens/s",
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tokens/s",
            f"peak memory: {self.peak_memory_gb:.3f} GB",
        ]


def read_prompt(prompt: str) -> str:
    """`-` reads the prompt from stdin (as mlx_lm.generate does); `\\n`/`\\t` are unescaped."""
    if prompt == "-":
        return sys.stdin.read()
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def prompt_ids(
    tokenizer,
    prompt: str,
    system_prompt: str | None = None,
    chat: bool = True,
    log: Callable[[str], None] = lambda m: None,
) -> list[int]:
    """Token ids to generate from: the chat template with a generation prompt (system +
    user messages) when `chat` and the tokenizer has one, else the raw text."""
    from mlx_kto.data.tokenize import _as_ids, chat_prompt_ids, has_chat_template

    if chat and has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return chat_prompt_ids(tokenizer, messages)  # rendered as training renders prompts
    if chat:
        log(
            f"note: the tokenizer has no chat template, so the prompt is used as raw text; {FLAG_HINT}"
        )
    if system_prompt:
        raise UserError(
            f"system-prompt: needs a chat template (the raw prompt has no system turn); {FLAG_HINT}"
        )
    return _as_ids(tokenizer.encode(prompt))


def generate(
    model,
    tokenizer,
    ids: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, GenerationStats]:
    """Stream up to `max_tokens` new tokens (mlx-lm's stream_generate and make_sampler);
    returns the text and the speed figures of the last step."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    for name, v in (("top-p", top_p), ("min-p", min_p)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name}: must be in [0, 1] (got {v})")
    if top_k < 0 or temp < 0 or max_tokens < 1:
        raise UserError("top-k and temp must be >= 0, max-tokens >= 1")
    sampler = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    text, last = [], None
    for resp in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler):
        text.append(resp.text)
        if on_text is not None and resp.text:
            on_text(resp.text)
        last = resp
    stats = GenerationStats(
        prompt_tokens=last.prompt_tokens if last else len(ids),
        prompt_tps=last.prompt_tps if last else 0.0,
        generation_tokens=last.generation_tokens if last else 0,
        generation_tps=last.generation_tps if last else 0.0,
        peak_memory_gb=last.peak_memory if last else 0.0,
    )
    return "".join(text), stats
