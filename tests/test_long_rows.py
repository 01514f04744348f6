"""Long rows are cut from a prefix of their text, with the ids full tokenization gives."""

import random

from mlx_kto.data.rows import Example
from mlx_kto.data.tokenize import CHARS_PER_TOKEN, SAFETY_TOKENS, tokenize_examples

import pytest

WORDS = "the sky is blue grass green hello thank you very much 12 34 ! ? , ; sea light".split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _reference(examples, tokenizer, max_length):
    """Full tokenization, then the truncation rule (prompt + completion <= max_length)."""
    rows, _ = tokenize_examples(examples, tokenizer, max_length=None)
    out = []
    for r in rows:
        if len(r.prompt_ids) >= max_length:
            continue
        out.append((r.prompt_ids, r.completion_ids[: max_length - len(r.prompt_ids)]))
    return out


@pytest.mark.parametrize("max_length", [8, 16, 33])
def test_rows_near_the_limit_match_full_tokenization(tokenizer, max_length, monkeypatch):
    # A small chars-per-token start makes the prefix path run (and grow) on short rows.
    monkeypatch.setattr("mlx_kto.data.tokenize.CHARS_PER_TOKEN", 1)
    monkeypatch.setattr("mlx_kto.data.tokenize.SAFETY_TOKENS", 4)
    import mlx_kto.data.tokenize as tk

    cuts = []
    real_cut = tk._whitespace_cut
    monkeypatch.setattr(tk, "_whitespace_cut", lambda t, c: cuts.append(c) or real_cut(t, c))
    rng = random.Random(max_length)
    examples = []
    for i in range(60):
        n = rng.randint(1, max_length)
        glue = rng.choice([" ", "", "\n", "  "])
        comp = glue.join(rng.choice(WORDS) for _ in range(n))
        examples.append(Example(f"Q {_text(rng, 1)}:", " " + comp, i % 2 == 0))
    rows, stats = tokenize_examples(examples, tokenizer, max_length=max_length)
    got = [(r.prompt_ids, r.completion_ids) for r in rows]
    assert got == _reference(examples, tokenizer, max_length)
    assert stats.n_truncated > 10  # the test covers truncated rows ...
    assert stats.n_kept - stats.n_truncated >= 2  # ... and rows that fit
    assert len(cuts) > 20  # and the prefix path ran


def test_default_constants_match_full_tokenization(tokenizer):
    rng = random.Random(0)
    need = CHARS_PER_TOKEN * (32 + SAFETY_TOKENS)
    examples = [Example("Say:", " " + _text(rng, need // 3 + k * 50), k % 2 == 0) for k in range(6)]
    rows, stats = tokenize_examples(examples, tokenizer, max_length=32)
    assert [(r.prompt_ids, r.completion_ids) for r in rows] == _reference(examples, tokenizer, 32)
    assert stats.n_truncated == 6


def test_a_20mb_completion_is_cut_cheaply(tokenizer):
    seen = []
    encode = tokenizer.encode

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode(self, text, *a, **kw):
            seen.append(len(text))
            return encode(text, *a, **kw)

    import resource

    big = " " + "the sky is blue " * (20_000_000 // 16)
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    rows, stats = tokenize_examples([Example("Hi:", big, True)], Spy(), max_length=64)
    assert stats.n_truncated == 1 and len(rows[0].tokens) == 64
    # The work is bounded by max_length, not by the text: the prompt, then one prefix of
    # CHARS_PER_TOKEN * (64 + SAFETY_TOKENS) characters (grown 4x only if it falls short).
    # Structural, unlike a wall-clock bound that a busy or slow machine breaks.
    assert len(seen) <= 3, seen
    assert sum(seen) < 4 * CHARS_PER_TOKEN * (64 + SAFETY_TOKENS) + 100, seen
    # Full tokenization of the row took 3.8 GB; the process peak barely moves now.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0 < 300_000


def test_prompt_cuts_are_reported(tiny_llama, tmp_path):
    import json

    from mlx_kto.cli.app import cli
    from mlx_kto.config.core import make_config
    from mlx_kto.train.run import prepare_data

    from click.testing import CliRunner

    rows = [
        {"prompt": "Tell me about the sky and the sea and the grass, please.", "completion": c,
         "label": i % 2 == 0}
        for i, c in enumerate([" Sure.", " No.", " Of course!", " Go away."])
    ]  # fmt: skip
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(
        cli, ["data", "check", str(data), "--model", str(tiny_llama), "--max-prompt-length", "4"]
    )
    assert res.exit_code == 0, res.output
    assert "4 prompts cut to their last 4 tokens" in res.output
    logged = []
    cfg = make_config(None, model=str(tiny_llama), data=str(data), max_prompt_length=4)
    from mlx_lm.utils import load_tokenizer

    prepare_data(cfg, load_tokenizer(tiny_llama), log=logged.append)
    assert any("cut 4 prompts" in line and "max_prompt_length=4" in line for line in logged)
