"""A GGUF file's tokenizer, built from its own metadata with the `tokenizers` library (no torch,
no transformers GGUF reader), written once as Hugging Face files and cached.

What a GGUF stores (llama.cpp's converter, `tokenizer.ggml.*`): the model family (`model`),
the pre-tokenizer name (`pre`), the vocabulary in id order (`tokens`), SentencePiece scores
(`scores`), token types (`token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte), BPE merges (`merges`, byte-level vocabularies only), the bos / eos / unk /
padding ids, add_bos / add_eos / add_space_prefix, and `tokenizer.chat_template`.
The families built here are the ones in use (see `gguf_vocab` for the pipelines):
- `gpt2`: byte-level BPE (Llama 3, Qwen 2/3, SmolLM, Phi-4-mini), split by `pre`'s regex;
- `llama`: SentencePiece BPE with byte fallback (Llama 2, Mistral, Phi-3), and its Gemma
  variant (Gemma 1/2/3 files, picked by architecture), merges rebuilt from the vocabulary.
The result agrees token for token with transformers' own GGUF tokenizer and llama.cpp's
(tests/test_gguf_tokenizer_real.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_reader import MAPPING_VERSION, meta, read_header
from mlx_kto.model.gguf_vocab import build_tokenizer
from mlx_kto.runtime.paths import default_cache_dir

import tokenizers

VOCAB_KEYS = frozenset(
    f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges")
)  # the arrays the tokenizer needs (read_header skips them otherwise)
_SPECIAL = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}


def read_vocab(path: Path) -> dict:
    """The tokenizer metadata of a GGUF file, checked: one line naming the file and key
    for anything missing or inconsistent."""
    reader = read_header(path, arrays=VOCAB_KEYS)
    spec = {
        "arch": meta(reader, "general.architecture"),
        "model": meta(reader, "tokenizer.ggml.model"),
        "pre": meta(reader, "tokenizer.ggml.pre"),
        "tokens": meta(reader, "tokenizer.ggml.tokens"),
        "scores": meta(reader, "tokenizer.ggml.scores"),
        "types": meta(reader, "tokenizer.ggml.token_type"),
        "merges": meta(reader, "tokenizer.ggml.merges"),
        "add_space_prefix": meta(reader, "tokenizer.ggml.add_space_prefix"),
        "add_bos": meta(reader, "tokenizer.ggml.add_bos_token"),
        "add_eos": meta(reader, "tokenizer.ggml.add_eos_token", False),
        "chat_template": meta(reader, "tokenizer.chat_template"),
        "context_length": meta(reader, f"{meta(reader, 'general.architecture')}.context_length"),
    }
    if spec["model"] is None:
        raise UserError(f"{path}: no tokenizer in this GGUF (no tokenizer.ggml.model)")
    tokens = spec["tokens"]
    if not tokens:
        raise UserError(f"{path}: tokenizer.ggml.tokens is missing or empty")
    for key in ("scores", "types"):
        if spec[key] is not None and len(spec[key]) != len(tokens):
            raise UserError(
                f"{path}: tokenizer.ggml.{'token_type' if key == 'types' else key} has "
                f"{len(spec[key])} entries, tokenizer.ggml.tokens {len(tokens)}"
            )
    for name, key in _SPECIAL.items():
        tid = meta(reader, f"tokenizer.ggml.{key}_token_id")
        if tid is not None and not (isinstance(tid, int) and 0 <= tid < len(tokens)):
            raise UserError(
                f"{path}: tokenizer.ggml.{key}_token_id is {tid!r}, not a token id "
                f"(the vocabulary has {len(tokens)})"
            )
        spec[f"{name}_id"] = tid
    return spec


def tokenizer_config(spec: dict) -> dict:
    """tokenizer_config.json for the built tokenizer: special tokens, bos / eos flags and
    the chat template (a class name transformers 4 and 5 both know)."""
    tokens = spec["tokens"]
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name in _SPECIAL:
        if spec[f"{name}_id"] is not None:
            conf[f"{name}_token"] = tokens[spec[f"{name}_id"]]
    conf["add_bos_token"] = bool(spec["add_bos_flag"])
    conf["add_eos_token"] = bool(spec["add_eos"]) and spec["eos_id"] is not None
    if spec["context_length"]:
        conf["model_max_length"] = int(spec["context_length"])
    if spec["chat_template"]:
        conf["chat_template"] = spec["chat_template"]
    return conf


def save_tokenizer(path: Path, out_dir: Path) -> None:
    """Write the GGUF's tokenizer as Hugging Face files: tokenizer.json (built here) and
    tokenizer_config.json (special tokens, bos / eos flags, the chat template)."""
    spec = read_vocab(path)
    try:
        tok = build_tokenizer(spec)
    except ValueError as e:  # a family or pre-tokenizer we do not build: say which
        raise UserError(f"{path}: {e}") from None
    tok.save(str(out_dir / "tokenizer.json"))
    conf = tokenizer_config(spec)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(conf, indent=2, ensure_ascii=False))


def _tokenizer_cache(path: Path) -> Path:
    """Cache folder of a GGUF file's tokenizer, keyed like the fingerprint's file memo by
    (real path, size, mtime_ns) plus the tokenizers version and our mapping version."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{tokenizers.__version__}\0{MAPPING_VERSION}"
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return default_cache_dir() / "gguf_tokenizers" / digest


def tokenizer_dir(path: str | Path) -> Path:
    """A folder with the GGUF file's tokenizer as Hugging Face files, built once (a 262k
    vocabulary's merges take seconds) and then cached."""
    path = Path(path)
    folder = _tokenizer_cache(path)
    if not (folder / "tokenizer_config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        try:
            save_tokenizer(path, tmp)
            try:
                os.replace(tmp, folder)  # atomic: a reader never sees half the files
            except OSError:  # another process got there first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_gguf_tokenizer(path: str | Path, eos_token_ids=None):
    """mlx-lm's TokenizerWrapper for the tokenizer stored in a GGUF file."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tokenizer_dir(path), eos_token_ids=eos_token_ids)
