"""`mlx-kto demo --real`: KTO on a real model's own replies (SmolLM2-135M-Instruct, Q4_1 GGUF).

1. Sample the base model's replies to training prompts (seeded, temperature 1).
2. Rate each by a deterministic rule (`is_desirable`): the reply opens with "The".
   Measured on the base model here: 6 of 32 replies (~19%) do, so the preference is
   present in some replies but not most -- KTO has something to amplify.
3. Train a KTO LoRA on those thumbs-up/down rows, then sample held-out prompts with
   and without the adapter and print the measured share before -> after.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError

PREFERRED_FIRST_WORD = "The"
TRAIN_PROMPTS = [
    "What is the capital of France?", "Why is the sky blue?", "Give me a tip for sleeping better.",
    "What do bees make?", "How do I boil an egg?", "Name a fast animal.", "What is rain?",
    "How can I learn to code?", "What is a volcano?", "Why do cats purr?",
    "What is the moon made of?", "How do plants grow?",
]  # fmt: skip
HELDOUT_PROMPTS = [
    "What is the largest ocean?", "Why do leaves change color?", "How does a rainbow form?",
    "What is a good breakfast?", "Why is the sea salty?", "What do cows eat?",
]  # fmt: skip
FETCH_HINT = "bash .ci/fetch_smollm2.sh"


@dataclass
class RealDemoSizes:
    train_prompts: int = 12  # prompts sampled for the ratings
    train_samples: int = 4  # replies per training prompt
    heldout_prompts: int = 6
    heldout_samples: int = 4
    max_tokens: int = 24  # short replies: the rule looks at the first word only
    steps: int = 20


def is_desirable(reply: str) -> bool:
    """The rating rule: thumbs up when the reply's first word is "The"."""
    words = reply.strip().split()
    return bool(words) and words[0].strip("\"'*:,.") == PREFERRED_FIRST_WORD


def share(samples: list[list[str]]) -> float:
    flat = [c for per in samples for c in per]
    return sum(map(is_desirable, flat)) / max(len(flat), 1)


def smollm2_gguf() -> Path:
    import os

    root = Path(os.environ.get("MLX_KTO_TEST_ASSETS", "~/.cache/mlx_kto_test")).expanduser()
    p = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise UserError(f"{p}: SmolLM2 GGUF not found; fetch it with `{FETCH_HINT}`")
    return p


def run_real_demo(
    out: str = "kto-demo-real", sizes: RealDemoSizes | None = None, seed: int = 0, echo=print
) -> dict:
    """Sample, rate, train, re-sample; returns {"before", "after", "seconds", ...}."""
    from mlx_kto.config import KTOConfig
    from mlx_kto.demo.sample import sample_completions
    from mlx_kto.model import load_gguf_for_inference
    from mlx_kto.train import train

    sizes = sizes or RealDemoSizes()
    t0 = time.perf_counter()
    gguf = smollm2_gguf()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_q = TRAIN_PROMPTS[: sizes.train_prompts]
    held_q = HELDOUT_PROMPTS[: sizes.heldout_prompts]
    kw = dict(max_tokens=sizes.max_tokens, temp=1.0, seed=seed)
    echo(f"real KTO demo on {gguf.name}: thumbs up for replies opening with "
         f"{PREFERRED_FIRST_WORD!r}")  # fmt: skip
    model, tok = load_gguf_for_inference(gguf, log=lambda *_: 0)
    own = sample_completions(model, tok, train_q, n=sizes.train_samples, **kw)
    before_s = sample_completions(model, tok, held_q, n=sizes.heldout_samples, **kw)
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
    echo(f"rated {len(rows)} of the base model's own replies: {ups} thumbs up")
    cfg = KTOConfig(
        model=str(gguf), data=str(data), adapter_path=str(out_dir / "run"), iters=sizes.steps,
        batch_size=4, max_length=64, learning_rate=2e-3, num_layers=8, lora_rank=8, beta=0.1,
        desirable_weight="auto", steps_per_eval=0, steps_per_report=5, quiet=True, seed=seed,
        overwrite=True,
    )  # fmt: skip
    res = train(cfg, log=lambda *_: 0)
    model, tok = load_gguf_for_inference(gguf, str(res.adapter_path), log=lambda *_: 0)
    after_s = sample_completions(model, tok, held_q, n=sizes.heldout_samples, **kw)
    before, after = share(before_s), share(after_s)
    seconds = time.perf_counter() - t0
    n = len(held_q) * sizes.heldout_samples
    echo(f"replies opening with {PREFERRED_FIRST_WORD!r} on {n} held-out samples: "
         f"{before:.1%} -> {after:.1%}")  # fmt: skip
    echo(f"adapter: {res.adapter_path}")
    echo(f"real demo finished in {seconds:.0f}s ({res.steps} training steps)")
    return {"before": before, "after": after, "seconds": seconds, "steps": res.steps,
            "adapter_path": str(res.adapter_path)}  # fmt: skip
