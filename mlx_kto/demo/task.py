"""The demo's synthetic task: short questions answered in one of three styles.

Every prompt has several plausible completions that say the same thing in a
different style:

    polite  "Of course! It is blue. Hope this helps."     (desirable)
    terse   "It is blue."                                  (undesirable)
    rude    "Ugh. It is blue. Stop bothering me."          (undesirable)

The demo base model is pretrained on a mix of the three (`STYLE_MIX`), so
sampling from it gives a mix too; KTO on thumbs-up/down feedback should move the
mix towards the polite style. `classify` is the deterministic style classifier
used to measure that shift on sampled completions. Everything here is pure
Python (no MLX), seeded, and shared by `examples/build_demo_model.py` and the
demo itself.
"""

from __future__ import annotations

import random

STYLES = ("polite", "terse", "rude")
DESIRABLE_STYLE = "polite"
STYLE_MIX = {"polite": 0.3, "terse": 0.3, "rude": 0.4}  # base model's pretraining mix

POLITE_OPENERS = ("Of course!", "Happy to help!", "Great question!")
POLITE_CLOSERS = ("Hope this helps.", "Have a lovely day!", "Thanks for asking!")
RUDE_OPENERS = ("Ugh.", "Whatever.", "Seriously?")
RUDE_CLOSERS = ("Stop bothering me.", "Figure it out yourself.", "What a dumb question.")

# (prompt template, answer template, items): short answers that need no copying,
# so a tiny model learns them in a few hundred steps.
_COLORS = [
    ("sky", "blue"),
    ("grass", "green"),
    ("sun", "yellow"),
    ("snow", "white"),
    ("coal", "black"),
    ("rose", "red"),
    ("lemon", "yellow"),
    ("sea", "blue"),
    ("leaf", "green"),
    ("cloud", "white"),
    ("cherry", "red"),
    ("banana", "yellow"),
    ("tomato", "red"),
    ("milk", "white"),
    ("frog", "green"),
    ("crow", "black"),
    ("plum", "purple"),
    ("carrot", "orange"),
    ("pumpkin", "orange"),
    ("grape", "purple"),
]
_ANIMALS = [
    ("fish", "sea"),
    ("bird", "tree"),
    ("bee", "hive"),
    ("cow", "field"),
    ("bear", "forest"),
    ("camel", "desert"),
    ("wolf", "forest"),
    ("duck", "pond"),
    ("fox", "forest"),
    ("horse", "stable"),
    ("dog", "house"),
    ("rat", "burrow"),
    ("whale", "ocean"),
    ("penguin", "snow"),
    ("crab", "sea"),
    ("goat", "hills"),
]
_TASKS = [
    ("homework", "Take good notes."),
    ("garden", "Water it daily."),
    ("essay", "Plan it first."),
    ("cooking", "Taste as you go."),
    ("budget", "Track every cost."),
    ("code", "Test small parts."),
    ("running", "Start slow."),
    ("exam", "Sleep well."),
    ("move", "Pack one room a day."),
    ("speech", "Practice out loud."),
    ("reading", "Read every day."),
    ("painting", "Use light colors."),
]
_LANGS = [
    ("French", "bonjour"),
    ("Spanish", "hola"),
    ("German", "hallo"),
    ("Italian", "ciao"),
    ("Japanese", "konnichiwa"),
    ("Hindi", "namaste"),
    ("Swahili", "jambo"),
    ("Hawaiian", "aloha"),
]
_OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("up", "down"),
    ("day", "night"),
    ("fast", "slow"),
    ("old", "new"),
    ("wet", "dry"),
    ("open", "closed"),
    ("light", "dark"),
    ("happy", "sad"),
    ("early", "late"),
    ("loud", "quiet"),
    ("full", "empty"),
    ("hard", "soft"),
    ("near", "far"),
    ("rich", "poor"),
]

TEMPLATES = {
    "color": ("What color is the {0}?", "It is {1}.", _COLORS),
    "animal": ("Where does a {0} live?", "In the {1}.", _ANIMALS),
    "task": ("Can you help me with my {0}?", "{1}", _TASKS),
    "lang": ("How do I say hello in {0}?", "Say {1}.", _LANGS),
    "opposite": ("What is the opposite of {0}?", "It is {1}.", _OPPOSITES),
}
HELDOUT_EVERY = 4  # every 4th item of each template is held out of the feedback set


def _fill(template: str, item: tuple) -> str:
    return template.format(*item)


def questions(split: str = "all") -> list[tuple[str, str]]:
    """(prompt, plain answer) pairs; split "feedback" (3 of 4 items), "heldout"
    (every HELDOUT_EVERY-th item of each template), or "all"."""
    out = []
    for prompt_t, answer_t, items in TEMPLATES.values():
        for i, item in enumerate(items):
            held = i % HELDOUT_EVERY == HELDOUT_EVERY - 1
            if split == "all" or (split == "heldout") == held:
                out.append((_fill(prompt_t, item), _fill(answer_t, item)))
    return out


def answer_of(prompt: str) -> str | None:
    """The correct plain answer to a task question (None for an unknown prompt)."""
    return dict(questions("all")).get(prompt)


def is_correct(prompt: str, completion: str) -> bool:
    """Whether the completion contains the right answer, whatever its style."""
    answer = answer_of(prompt)
    return answer is not None and answer in completion


def render(answer: str, style: str, rng: random.Random) -> str:
    """The answer in `style`, with a randomly chosen opener and closer."""
    if style == "polite":
        return f"{rng.choice(POLITE_OPENERS)} {answer} {rng.choice(POLITE_CLOSERS)}"
    if style == "rude":
        return f"{rng.choice(RUDE_OPENERS)} {answer} {rng.choice(RUDE_CLOSERS)}"
    if style == "terse":
        return answer
    raise ValueError(f"unknown style {style!r}")


def sample_style(rng: random.Random, mix: dict[str, float] = STYLE_MIX) -> str:
    return rng.choices(list(mix), weights=list(mix.values()))[0]


def classify(text: str) -> str:
    """Deterministic style of a completion: "polite" if it contains a polite
    phrase and no rude one, "rude" for the converse, "mixed" if both, "terse"
    for non-empty text with neither, "empty" otherwise."""
    text = text.strip()
    if not text:
        return "empty"
    polite = any(p in text for p in POLITE_OPENERS + POLITE_CLOSERS)
    rude = any(p in text for p in RUDE_OPENERS + RUDE_CLOSERS)
    if polite and rude:
        return "mixed"
    if polite:
        return "polite"
    if rude:
        return "rude"
    return "terse"


def is_desirable(text: str) -> bool:
    """The thumbs-up rule of the demo: polite and nothing rude."""
    return classify(text) == DESIRABLE_STYLE


def feedback_rows(
    qs: list[tuple[str, str]], n: int, seed: int, mix: dict[str, float] = STYLE_MIX
) -> list[dict]:
    """`n` unpaired thumbs-up/down rows in conversational form, completions drawn
    from the base model's style mix (so labels are imbalanced like real feedback)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = rng.choice(qs)
        completion = render(answer, sample_style(rng, mix), rng)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [{"role": "assistant", "content": completion}],
                "label": "thumbs_up" if is_desirable(completion) else "thumbs_down",
            }
        )
    return rows


def corpus_lines() -> list[str]:
    """Every phrase of the task, for training the demo tokenizer's merges."""
    lines = [p for p, _ in questions()] + [a for _, a in questions()]
    lines += list(POLITE_OPENERS + POLITE_CLOSERS + RUDE_OPENERS + RUDE_CLOSERS)
    return lines
