"""Labelling replies thumbs-up / thumbs-down: a rule (a Python function) or a local judge model.

- A rule is `rule(prompt: str, reply: str) -> bool`: True = desirable. From the command line
  it is `--judge FILE.py:FUNCTION`, loaded from that file only (never from a module search
  path: the user's own code runs, and only the code the user named). `prompt` is the prompt
  text (for a chat prompt, its last user message), as the judges of `mlx-kto compare` get it.
- A judge model answers a yes/no rubric about each (prompt, reply): the verdict is whichever of
  "Yes" / "No" it makes more likely as the first token of its answer (the first-token reading
  of `judge.judges.ModelJudge`, which this subclasses; a tie is "No").

Every mistake is one line naming the rule and the prompt: a missing file or function, an
exception, a value that is not a bool (0 / 1 / "yes" are refused: they hide bugs).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.judge.judges import ModelJudge
from mlx_kto.judge.sample import Prompt, prompt_ids
from mlx_kto.model.load import load_base

import numpy as np

RUBRIC_PROMPT = (
    "{rubric}\n\nPrompt: {prompt}\n\nReply: {reply}\n\n"
    "Answer the question above about the reply with one word, Yes or No."
)


class RuleLabeller:
    """Labels with a Python function `(prompt, reply) -> bool`; `name` says which."""

    def __init__(self, rule: Callable[[str, str], bool], name: str):
        self.rule, self.name = rule, name

    def __call__(self, prompt: str, reply: str) -> bool:
        try:
            value = self.rule(prompt, reply)
        except Exception as e:  # the user's code: one line naming it and the prompt
            raise UserError(
                f"judge {self.name}: raised {type(e).__name__}: {e} (prompt {prompt[:60]!r})"
            ) from None
        if not isinstance(value, (bool, np.bool_)):
            raise UserError(
                f"judge {self.name}: returned {value!r} ({type(value).__name__}) for prompt "
                f"{prompt[:60]!r}; it must return True (desirable) or False"
            )
        return bool(value)

    def label(
        self, prompts: Sequence[Prompt], replies: Sequence[Sequence[str]]
    ) -> list[list[bool]]:
        """One label per reply, `replies[i]` answering `prompts[i]`."""
        return [[self(p.text, r) for r in rs] for p, rs in zip(prompts, replies)]

    def describe(self) -> dict:
        return {"rule": self.name}


def load_rule_file(spec: str) -> RuleLabeller:
    """The rule of `--judge FILE.py:FUNCTION`: FILE must be an existing .py file (the module
    is executed: it is the user's own code), FUNCTION a function in it."""
    file, sep, fn_name = spec.rpartition(":")
    if not sep or not file or not fn_name:
        raise UserError(f"--judge: '{spec}' is not FILE.py:FUNCTION")
    path = Path(file)
    if path.suffix != ".py":
        raise UserError(f"--judge: {file}: not a .py file (give FILE.py:FUNCTION)")
    if not path.is_file():
        raise UserError(f"--judge: {file}: no such file")
    module_spec = importlib.util.spec_from_file_location(f"_mlx_kto_rule_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's module failed to run: say where, one line
        raise UserError(f"--judge: {file}: cannot load ({type(e).__name__}: {e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        raise UserError(f"--judge: {file} has no function '{fn_name}'")
    if not callable(fn):
        raise UserError(f"--judge: {file}: '{fn_name}' is not a function")
    return RuleLabeller(fn, f"{file}:{fn_name}")


def python_rule(fn: Callable[[str, str], bool]) -> RuleLabeller:
    """A judge given as a Python function (the Python API)."""
    if not callable(fn):
        raise UserError(f"judge: {fn!r} is not a function (prompt, reply) -> bool")
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
    return RuleLabeller(fn, name)


class RubricJudge(ModelJudge):
    """A local model answering a yes/no `rubric` about (prompt, reply): P(Yes) vs P(No) as the
    first answer token, batched (see the module docstring)."""

    def __init__(self, model, tokenizer, rubric: str, name: str, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.rubric, self.name = rubric, name
        self.a_ids, self.b_ids = self._letter_ids("Yes"), self._letter_ids("No")
        if not self.a_ids or not self.b_ids or set(self.a_ids) & set(self.b_ids):
            raise UserError(f"--judge-model {name}: its tokenizer does not tell 'Yes' from 'No'")

    def query_ids(self, prompt: str, reply: str, _unused: str = "") -> list[int]:
        text = RUBRIC_PROMPT.format(rubric=self.rubric.strip(), prompt=prompt, reply=reply)
        return prompt_ids(self.tokenizer, text)

    def label(
        self, prompts: Sequence[Prompt], replies: Sequence[Sequence[str]]
    ) -> list[list[bool]]:
        pairs = [(p.text, r, "") for p, rs in zip(prompts, replies) for r in rs]
        was_training = self.model.training
        self.model.eval()
        try:
            flat = iter([v > 0 for v in self.preferences(pairs)])  # +1 = "Yes" more likely
        finally:
            self.model.train(was_training)
        return [[next(flat) for _ in rs] for rs in replies]

    def describe(self) -> dict:
        return {"model": self.name, "rubric": self.rubric}


def load_rubric_judge(model: str, rubric: str, dtype: str | None = None) -> RubricJudge:
    """The judge model of `--judge-model M --rubric TEXT`, loaded as training loads models."""

    jm, jt, _, _ = load_base(KTOConfig(model=model, dtype=dtype), log=lambda *_: None)
    jm.eval()
    return RubricJudge(jm, jt, rubric, model)
