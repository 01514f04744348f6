"""The prompts of a rounds run: the training prompts and the held-out ones, never overlapping.

A prompts file is read by the judge's `load_prompts` (a .jsonl of {"prompt": text or
messages} rows, a .json list, or a .txt of one prompt per line); the Python API also takes a
list of texts or message lists. Without a held-out file, a seeded draw of
`heldout_fraction` of the prompts is held out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.judge.sample import Prompt, load_prompts


def read_prompts(source, flag: str) -> list[Prompt]:
    """Prompts from a file (its errors name the file and line) or a list (Python API)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            raise UserError(f"{flag}: {path} is a folder; give a .jsonl or .txt file of prompts")
        prompts, _ = load_prompts(path)
        return prompts
    if not isinstance(source, (list, tuple)):
        raise UserError(f"{flag}: expected a file or a list of prompts")
    out = []
    for i, p in enumerate(source):
        where = f"{flag}[{i}]"
        if isinstance(p, Prompt):
            out.append(p)
        elif isinstance(p, str) and p.strip():
            out.append(Prompt(p, where))
        elif isinstance(p, list) and p and all(isinstance(m, dict) for m in p):
            out.append(Prompt(list(p), where))
        else:
            raise UserError(f"{where}: an empty or unusable prompt ({p!r}); give text or messages")
    if not out:
        raise UserError(f"{flag}: no prompts")
    return out


def key(p: Prompt) -> str:
    return json.dumps(p.prompt, sort_keys=True)


def split(cfg, log=print) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts) of a RoundsConfig; a prompt never in both."""
    prompts = _dedupe(read_prompts(cfg.prompts, "--prompts"))
    if cfg.heldout is not None:
        held = _dedupe(read_prompts(cfg.heldout, "--heldout"))
        held_keys = {key(p) for p in held}
        train = [p for p in prompts if key(p) not in held_keys]
        if len(train) < len(prompts):
            log(f"{len(prompts) - len(train)} of the training prompts are also held out: "
                "not trained on")  # fmt: skip
        if not train:
            raise UserError(
                f"{cfg.prompts}: every prompt is also in --heldout; none left to train on"
            )
        return train, held
    if len(prompts) < 2:
        raise UserError(
            f"{cfg.prompts}: one prompt cannot be split into training and held-out prompts; "
            "add prompts or give --heldout FILE"
        )
    n_held = min(len(prompts) - 1, max(1, round(cfg.heldout_fraction * len(prompts))))
    held_idx = set(random.Random(cfg.train.seed).sample(range(len(prompts)), n_held))
    return ([p for i, p in enumerate(prompts) if i not in held_idx],
            [p for i, p in enumerate(prompts) if i in held_idx])  # fmt: skip


def _dedupe(prompts: list[Prompt]) -> list[Prompt]:
    seen, out = set(), []
    for p in prompts:
        if key(p) not in seen:
            seen.add(key(p))
            out.append(p)
    return out


def as_messages(p: Prompt) -> list[dict]:
    """The prompt as the message list a chat rating stores (a text is one user turn)."""
    if isinstance(p.prompt, str):
        return [{"role": "user", "content": p.prompt}]
    return [dict(m) for m in p.prompt]
