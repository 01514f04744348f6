"""The current policy of a round (the base, or the base plus the previous round's adapter)
and seeded sampling from it through the judge's sampler (`judge.sample.sample_replies`).

Seeds: every held-out measurement uses the run's seed (the same draws each round, so a
change between rounds is the model's); round r's training replies use seed + r (a fresh
draw each round).
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.judge.sample import Prompt, Sample, prompt_ids, sample_replies
from mlx_kto.model.load import load_base, load_init_adapter

import mlx.core as mx
import mlx.nn as nn

# A GGUF base this small (dense float32 bytes) is dequantized once for sampling: on the CPU
# each decode step would otherwise dequantize every layer again (~2x slower on SmolLM2-135M).
DEQUANTIZE_BELOW_BYTES = 2 * 2**30


def load_policy(cfg: KTOConfig, adapter: str | Path | None, log=None):
    """(model, tokenizer) for sampling: cfg's model (dtype, chat template) plus `adapter`."""
    cfg = dataclasses.replace(cfg)
    model, tokenizer, path, _ = load_base(cfg, log=log or (lambda *_: None))
    if Path(path).suffix.lower() == ".gguf" and cfg.quantize is None:
        model = _dense_if_small(model)
    if adapter is not None:
        load_init_adapter(model, adapter, "round adapter")
    model.eval()
    mx.eval(model.parameters())
    return model, tokenizer


def _dense_if_small(model: nn.Module) -> nn.Module:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model

    quantized = any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    if not quantized or n * 8 * 4 > DEQUANTIZE_BELOW_BYTES:  # packed 4-bit: <= 8 values / word
        return model
    return dequantize_model(model)


def release() -> None:
    """Give back the memory of a model the caller dropped (training loads its own copy)."""
    gc.collect()
    mx.clear_cache()


def sample(model, tokenizer, prompts: list[Prompt], n: int, settings: dict) -> list[list[Sample]]:
    """`n` replies per prompt with `settings` (max_tokens, temp, seed). Prompts of one token
    length decode together (not left-padded: a sliding-window model's caches are not
    mlx-lm's BatchKVCache), as `compare` samples."""
    ids = [prompt_ids(tokenizer, p.prompt, raw=p.raw, where=p.where) for p in prompts]
    return sample_replies(
        model, tokenizer, ids, n=n, max_tokens=settings["max_tokens"], temp=settings["temp"],
        seed=settings["seed"],
    )  # fmt: skip


def sampling_settings(cfg, n: int, seed: int) -> dict:
    """What a round's feedback rows record as their `sampling`."""
    return {"temp": cfg.temp, "top_p": 1.0, "max_tokens": cfg.max_tokens, "n": n, "seed": seed}
