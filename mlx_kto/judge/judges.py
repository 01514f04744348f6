"""Judges: which of two replies to a prompt is better, and the win rate against the base.

Every judge is a function `judge(prompt, reply_a, reply_b) -> +1 | -1 | 0` (A better, B
better, tie). Two kinds:

- a user's Python rule, `--judge module:function` (or `path/to/file.py:function`):
    * `def score(prompt: str, reply: str) -> float`: a score per reply, higher is better;
      the higher score wins, equal scores tie;
    * `def prefer(prompt: str, reply_a: str, reply_b: str) -> float | int | str`: > 0 or
      "a" = A is better, < 0 or "b" = B is better, 0 / "tie" / None = a tie. It is asked in
      both orders, and a verdict that flips with the order is a tie.
  The rule is told apart by how many positional parameters it takes (2 or 3). `prompt`
  is the prompt text (for a chat prompt, its last user message).
- a local judge model (`--judge-model M`, anything mlx-lm loads): shown the prompt and both
  replies, asked which is better; its verdict is whichever of the tokens "A" / "B" it
  gives the higher probability as the first token of its answer. Asked in both orders
  (A/B swapped); it wins only when both orders agree, otherwise a tie (this removes the
  position bias small judges have).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path

from mlx_kto.data.tokenize import _as_ids
from mlx_kto.errors import UserError
from mlx_kto.judge.sample import prompt_ids

import mlx.core as mx

Judge = Callable[[str, str, str], int]

JUDGE_PROMPT = (
    "Which reply to the prompt below is better: more helpful, correct and well written? "
    "Answer with a single letter, A or B.\n\n"
    "Prompt: {prompt}\n\nReply A: {a}\n\nReply B: {b}\n\nThe better reply is"
)


def _verdict(value, where: str) -> int:
    """A rule's preference as +1 (A), -1 (B) or 0 (tie)."""
    if value is None:
        return 0
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("a", "first", "1"):
            return 1
        if v in ("b", "second", "2", "-1"):
            return -1
        if v in ("tie", "draw", "0", "", "none"):
            return 0
        raise UserError(f"judge {where}: returned {value!r}; expected a number, 'a', 'b' or 'tie'")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(
            f"judge {where}: returned {value!r}; expected a number, 'a', 'b' or 'tie'"
        ) from None
    if math.isnan(x):
        raise UserError(f"judge {where}: returned NaN")
    return (x > 0) - (x < 0)


def both_orders(prefer: Callable[[str, str, str], int]) -> Judge:
    """A judge asked as (a, b) and as (b, a): a verdict only when the two agree."""

    def judge(prompt: str, a: str, b: str) -> int:
        first, second = prefer(prompt, a, b), prefer(prompt, b, a)
        return first if first == -second else 0

    return judge


def load_rule(spec: str) -> Judge:
    """The judge of `--judge module:function` (a module on sys.path or the current folder,
    or a .py file path)."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UserError(f"judge: '{spec}' is not module:function (or path/to/file.py:function)")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise UserError(f"judge: {path}: no such file")
            spec_ = importlib.util.spec_from_file_location(f"_mlx_kto_judge_{path.stem}", path)
            module = importlib.util.module_from_spec(spec_)
            spec_.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say where, one line
        raise UserError(f"judge: cannot import '{mod_name}' ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"judge: '{mod_name}' has no function '{fn_name}'")
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) == 2:
        return score_judge(fn, spec)
    if len(params) == 3:
        return both_orders(lambda p, a, b: _verdict(_call(fn, spec, p, a, b), spec))
    raise UserError(
        f"judge: {spec} takes {len(params)} required arguments; expected (prompt, reply) -> "
        "score or (prompt, reply_a, reply_b) -> preference"
    )


def _call(fn, where: str, *args):
    """The user's rule, its own exceptions turned into one line naming the rule and prompt."""
    try:
        return fn(*args)
    except Exception as e:
        raise UserError(
            f"judge {where}: raised {type(e).__name__}: {e} (prompt {args[0][:60]!r})"
        ) from None


def _score(score, where: str, prompt: str, reply: str) -> float:
    value = _call(score, where, prompt, reply)
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"judge {where}: returned {value!r}; expected a number") from None
    if math.isnan(x):
        raise UserError(f"judge {where}: returned NaN")
    return x


def score_judge(score: Callable[[str, str], float], where: str = "rule") -> Judge:
    """A judge from a per-reply score: the higher score wins."""

    def judge(prompt: str, a: str, b: str) -> int:
        sa, sb = _score(score, where, prompt, a), _score(score, where, prompt, b)
        return (sa > sb) - (sa < sb)

    return judge


class ModelJudge:
    """A local model as a pairwise judge (see the module docstring)."""

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.a_ids, self.b_ids = self._letter_ids("A"), self._letter_ids("B")
        if set(self.a_ids) & set(self.b_ids):
            raise UserError("judge-model: its tokenizer does not tell 'A' from 'B'")

    def _letter_ids(self, letter: str) -> list[int]:
        ids = set()
        for text in (letter, " " + letter):
            toks = _as_ids(self.tokenizer.encode(text, add_special_tokens=False))
            if toks:
                ids.add(toks[-1] if text.startswith(" ") and len(toks) > 1 else toks[0])
        return sorted(ids)

    def query_ids(self, prompt: str, a: str, b: str) -> list[int]:
        return prompt_ids(self.tokenizer, JUDGE_PROMPT.format(prompt=prompt, a=a, b=b))

    def preferences(self, triples: list[tuple[str, str, str]]) -> list[int]:
        """+1 / -1 / 0 for each (prompt, a, b) in one order (A is the first reply)."""
        out = []
        queries = [self.query_ids(*t) for t in triples]
        for s in range(0, len(queries), self.batch_size):
            chunk = queries[s : s + self.batch_size]
            T = max(len(q) for q in chunk)
            # Right padding: the causal mask keeps pads out of each row's last real position.
            tokens = mx.array([q + [0] * (T - len(q)) for q in chunk], dtype=mx.int32)  # [B, T]
            logits = self.model(tokens)  # [B, T, V]
            last = mx.array([len(q) - 1 for q in chunk])
            logits = logits[mx.arange(len(chunk)), last].astype(mx.float32)  # [B, V]
            lp_a = mx.logsumexp(logits[:, mx.array(self.a_ids)], axis=-1)
            lp_b = mx.logsumexp(logits[:, mx.array(self.b_ids)], axis=-1)
            diff = (lp_a - lp_b).tolist()
            out += [(d > 0) - (d < 0) for d in diff]
        return out

    def judge_many(self, triples: list[tuple[str, str, str]]) -> list[int]:
        """Both orders for each triple; a verdict only when they agree."""
        was_training = self.model.training
        self.model.eval()
        try:
            first = self.preferences(triples)
            second = self.preferences([(p, b, a) for p, a, b in triples])
        finally:
            self.model.train(was_training)
        return [f if f == -s else 0 for f, s in zip(first, second)]


def win_rate(
    judge: Judge | ModelJudge, prompts: list[str], candidate: list[list[str]], base: list[list[str]]
) -> dict:
    """Wins / losses / ties of the candidate's replies against the base's, pairing the i-th
    sample of each prompt (same seed, same draw index), and

        win_rate = (wins + ties / 2) / pairs

    (a tie counts half, as in AlpacaEval): 0.5 = no better than the base."""
    triples = [(p, c, b) for p, cs, bs in zip(prompts, candidate, base) for c, b in zip(cs, bs)]
    if isinstance(judge, ModelJudge):
        verdicts = judge.judge_many(triples)
    else:
        verdicts = [judge(*t) for t in triples]
    wins, losses = verdicts.count(1), verdicts.count(-1)
    ties = len(verdicts) - wins - losses
    n = len(verdicts)
    return {
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "win_rate": (wins + ties / 2) / n if n else None,
    }
