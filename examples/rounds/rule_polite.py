"""A labelling rule for `mlx-kto rounds --judge examples/rounds/rule_polite.py:polite`.

A rule is any Python function `(prompt: str, reply: str) -> bool`: True = thumbs up
(desirable), False = thumbs down. `prompt` is the prompt's text (for a chat prompt, its
last user message). It must return a real bool: 0/1 or "yes" are refused, so a rule that
forgot a `return` (None) fails loudly instead of labelling everything undesirable.

This one is the demo task's politeness rule: a polite phrase and no rude one
(`mlx_kto.demo.task.classify`), for the shipped demo model:

    mlx-kto rounds --model mlx_kto/demo/assets/model --prompts examples/rounds/demo_prompts.txt \\
        --heldout examples/rounds/demo_heldout.txt --judge examples/rounds/rule_polite.py:polite ...
"""

from mlx_kto.demo.task import classify


def polite(prompt: str, reply: str) -> bool:
    return classify(reply) == "polite"


def short(prompt: str, reply: str) -> bool:
    """Another rule of the kind rounds can train for: answers of at most 8 words."""
    return 0 < len(reply.split()) <= 8
