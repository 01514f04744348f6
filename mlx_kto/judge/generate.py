"""`mlx-kto generate`: one prompt, streamed token by token through mlx-lm's
`stream_generate`, with mlx-lm's generate flags (system prompt, top-p / min-p / top-k,
prompt from stdin) and its speed figures (prompt and generation tokens per second, peak
memory). The prompt is rendered by `judge.sample.prompt_ids`, as for every sampler here;
many prompts at once (probes, compare, the demo) go through `judge.sample.sample_replies`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from mlx_kto.errors import UserError
from mlx_kto.judge.sample import check_sampling, prompt_ids

__all__ = ["GenerationStats", "generate", "prompt_ids", "read_prompt"]


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
    """`-` reads the prompt from stdin (as mlx_lm.generate does); `\\n`/`\\t` are unescaped.
    An empty prompt (or empty stdin) is refused: the model would generate from nothing."""
    if prompt == "-":
        text = sys.stdin.read()
        if not text.strip():
            raise UserError("--prompt -: stdin was empty (nothing to generate from)")
        return text
    if not prompt.strip():
        raise UserError("--prompt: empty (nothing to generate from)")
    return prompt.replace("\\n", "\n").replace("\\t", "\t")


def generate(
    model,
    tokenizer,
    ids: list[int],
    max_tokens: int = 100,
    temp: float = 0.0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_k: int = 0,
    on_text: Callable[[str], None] | None = None,
) -> tuple[str, GenerationStats]:
    """Stream up to `max_tokens` new tokens (mlx-lm's stream_generate and make_sampler);
    returns the text and the speed figures of the last step."""
    from mlx_lm import stream_generate  # imports transformers: seconds of startup
    from mlx_lm.sample_utils import make_sampler

    check_sampling(temp, top_p, min_p, top_k, max_tokens, seed=None)
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
