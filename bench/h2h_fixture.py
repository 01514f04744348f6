"""The head-to-head fixture: bench/fixture.py's model and rows, readable by TRL as text.

TRL's KTOTrainer (1.16) only takes text (it tokenizes `prompt` and `prompt + completion + EOS`
itself), so the fixture ships a word-level tokenizer whose vocabulary is the model's 8000 ids:
`<pad>`=0, `<s>`=1, `</s>`=2 and `t3`..`t7999` = 3..7999, split on whitespace, `<s>` prepended.
Token id i is the text `t{i}`; a prompt is its ids after the BOS joined by spaces, a completion
the same with a leading space, so both trainers' own tokenization returns exactly the ids of
`bench_rows()` (completions end in EOS, which both add to standard rows: one token more than
bench_rows' completions). `check_round_trip` asserts it with mlx-kto's tokenizer; the TRL
runner asserts it on the dataset TRL prepared.

The weights are `bench_model()`'s (same seed, shape and init); only the tokenizer differs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fixture import BENCH_SHAPE, bench_rows

PAD, BOS, EOS = 0, 1, 2
VOCAB = BENCH_SHAPE["vocab_size"]
SEED = 0


def build_word_tokenizer(out_dir: Path):
    """Save the id-as-word tokenizer (HF fast tokenizer folder); returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({f"t{i}": i for i in range(3, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def h2h_model(root: Path) -> Path:
    """Build (once) the model folder: bench_model()'s weights + the word-level tokenizer."""
    from toy import build_model

    path = root / "llama-512x8-words"
    if not (path / "model.safetensors").exists():
        tok_dir = root / "word-tokenizer"
        build_word_tokenizer(tok_dir)
        tmp = root / f".llama-512x8-words.{os.getpid()}"
        build_model(
            tmp, family="llama", seed=0, init_std=0.02, tokenizer_dir=tok_dir, **BENCH_SHAPE
        )
        tmp.rename(path)  # a half-built folder is never taken for a built one
    return path


def h2h_token_rows(n: int) -> list[dict]:
    """n rows of token ids: bench_rows(n)'s prompts and completions + EOS, balanced labels."""
    return [
        {"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids + [EOS], "label": r.label}
        for r in bench_rows(n, seed=SEED, vocab=VOCAB, bos=BOS)
    ]


def _words(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def to_text(row: dict) -> dict:
    """{"prompt", "completion", "label"} whose tokenization is exactly the row's ids."""
    assert row["prompt_ids"][0] == BOS and row["completion_ids"][-1] == EOS
    return {
        "prompt": _words(row["prompt_ids"][1:]),
        # the EOS is left for the trainers to append, as they do to every standard row
        "completion": " " + _words(row["completion_ids"][:-1]),
        "label": row["label"],
    }


def write_fixture(root: Path, n: int) -> tuple[Path, Path]:
    """Write train.jsonl (text) and token_ids.json (the expected ids) for n rows."""
    data_dir = root / f"data-{n}"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = h2h_token_rows(n)
    text = data_dir / "train.jsonl"
    ids = data_dir / "token_ids.json"
    for path, body in (
        (text, "".join(json.dumps(to_text(r)) + "\n" for r in rows)),
        (ids, json.dumps(rows)),
    ):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(body)
        tmp.replace(path)
    return text, ids


def check_round_trip(model_dir: Path, text_path: Path, ids_path: Path) -> int:
    """Tokenize train.jsonl the way `mlx-kto train` does; assert the ids are the fixture's.
    Returns the number of rows checked."""
    from mlx_kto.data.rows import load_splits
    from mlx_kto.data.tokenize import tokenize_examples

    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    examples = load_splits(str(text_path), seed=SEED)["train"]
    rows, stats = tokenize_examples(examples, tokenizer, max_length=256)
    want = json.loads(ids_path.read_text())
    assert stats.n_boundary_merge == 0 and stats.n_truncated == 0, stats
    got = [(r.prompt_ids, r.completion_ids, r.label) for r in rows]
    exp = [(w["prompt_ids"], w["completion_ids"], w["label"]) for w in want]
    if sorted(got) != sorted(exp):
        raise AssertionError(f"mlx-kto tokenizes {text_path} differently from {ids_path}")
    return len(rows)
