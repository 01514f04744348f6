"""Carry a checkpoint's tokenizer files into a converted folder byte for byte.

Re-saving through transformers loses what other tools read: transformers 5 drops the
SentencePiece `tokenizer.model` (llama.cpp's convert_hf_to_gguf.py needs it for Phi-3
and prefers it for Llama/Mistral) and writes `tokenizer_class: TokenizersBackend`, a
class transformers 4.x (which llama.cpp pins) does not know. So fuse and hf-to-mlx copy
the source's own files instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Files (and folders) that make up a Hugging Face tokenizer, in any of its formats.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",  # SentencePiece (Llama 2, Mistral, Phi-3, Gemma)
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates",  # folder of named *.jinja templates
)
TOKENIZER_GLOBS = ("*.tiktoken", "tokenization_*.py")  # tiktoken vocabularies, remote code


def tokenizer_files(folder: str | Path) -> list[Path]:
    """The tokenizer files and folders present in `folder`, sorted by name."""
    folder = Path(folder)
    found = {folder / n for n in TOKENIZER_FILES if (folder / n).exists()}
    for pattern in TOKENIZER_GLOBS:
        found |= {p for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def copy_tokenizer_files(src: str | Path, dst: str | Path, replace: bool = False) -> list[str]:
    """Copy `src`'s tokenizer files into `dst` unchanged; returns their names ([] when
    `src` has none). With `replace`, tokenizer files in `dst` that `src` lacks (written
    by a re-save) are removed, so `dst` holds exactly the source's tokenizer. Each file
    goes through a temp copy + rename (no half-written file)."""
    src, dst = Path(src), Path(dst)
    files = tokenizer_files(src)
    if not files:
        return []
    names = {f.name for f in files}
    if replace:
        for old in tokenizer_files(dst):
            if old.name not in names:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    for f in files:
        tmp = dst / f".{f.name}.tmp{os.getpid()}"
        if f.is_dir():
            shutil.copytree(f, tmp)
            if (dst / f.name).is_dir():
                shutil.rmtree(dst / f.name)
        else:
            shutil.copyfile(f, tmp)
        os.replace(tmp, dst / f.name)
    return sorted(names)
