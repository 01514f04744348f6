"""A judge rule for `mlx-kto compare --judge examples/judge_polite.py:score`.

The demo's thumbs-up rule as a score: 1 for a polite answer (a polite phrase and no rude
one), 0 otherwise. A rule takes (prompt, reply) and returns a float (higher is better), or
takes (prompt, reply_a, reply_b) and returns a preference (> 0 or "a": A is better).
"""

from mlx_kto.demo.task import is_correct, is_desirable


def score(prompt: str, reply: str) -> float:
    # Polite counts most; the right answer breaks ties between two polite (or two impolite) replies.
    return 2.0 * is_desirable(reply) + 1.0 * is_correct(prompt, reply)
