"""Small labelled feedback files and quick training configs that several test modules share.

Tests import these helpers (or use the conftest fixtures built on them) instead of importing
private helpers from other test modules.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlx_kto.config.core import KTOConfig, make_config

GOOD = [" Sure, I would be happy to help you.", " Of course! Here is what you need to know."]
BAD = [" Go away, I do not care.", " No. Figure it out yourself."]
TOPICS = ["sky", "sea", "cat", "hat", "story", "poem", "answer", "homework", "grass", "light"]

# Conversational rows for the real-model tests: a short system prompt keeps rows short.
QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Name a fruit that is yellow.",
    "What is two plus three?", "Which planet is called the red planet?",
    "What do bees make?", "How many days are in a week?",
]  # fmt: skip
ANSWERS = ["Paris.", "Eight.", "Blue.", "A banana.", "Five.", "Mars.", "Honey.", "Seven."]


def write_feedback(path: str | Path, n: int, seed: int = 0, numbered: bool = False) -> Path:
    """Write `n` separable prompt/completion/label rows to `path` (JSON lines): even rows a
    polite completion labelled True, odd rows a rude one labelled False. `numbered`: each
    prompt ends with its row number, so no two rows share a sequence (the reference cache
    then scores every row once). Returns the path."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            topic = " ".join(rng.sample(TOPICS, 2)) + (f" {i}" if numbered else "")
            label = i % 2 == 0
            row = {
                "prompt": f"Tell me about the {topic}.",
                "completion": rng.choice(GOOD if label else BAD),
                "label": label,
            }
            f.write(json.dumps(row) + "\n")
    return Path(path)


def write_chat_feedback(path: str | Path) -> Path:
    """Conversational rows (messages + label), 16 of them: polite answers up, rude ones down."""
    with open(path, "w") as f:
        for q, a in zip(QUESTIONS, ANSWERS):
            for good in (True, False):
                reply = f"Happy to help! {a}" if good else "Figure it out yourself."
                msgs = [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": reply},
                ]
                f.write(json.dumps({"messages": msgs, "label": good}) + "\n")
    return Path(path)


def quick_cfg(model, data, out, **kw) -> KTOConfig:
    """A validated KTOConfig for a short run on a tiny model: 30 steps of batch 4 at lr 2e-3,
    rank-4 LoRA, rows cut at 64 tokens, no periodic eval, a checkpoint every 10 steps.
    Keyword arguments override any field."""
    base = dict(
        model=str(model), data=str(data), adapter_path=str(out), batch_size=4, iters=30,
        learning_rate=2e-3, lora_rank=4, lora_alpha=8.0, steps_per_eval=0, steps_per_save=10,
        max_length=64, quiet=True, seed=0, warmup_steps=3,
    )  # fmt: skip
    base.update(kw)
    return make_config(None, **base)
