"""A GGUF file's tokenizer as a Hugging Face tokenizer folder, converted once and cached."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_reader import MAPPING_VERSION
from mlx_kto.runtime import torchless as _torchless
from mlx_kto.runtime.paths import default_cache_dir


def save_tokenizer(path: Path, out_dir: Path) -> None:
    """Write the GGUF's tokenizer as Hugging Face tokenizer files (tokenizer.json,
    tokenizer_config.json with the chat template) via transformers' GGUF tokenizer, which
    needs torch: in a command process that keeps torch out (`_torchless`), in a child."""
    if _torchless.kept_out():
        return _save_tokenizer_in_child(path, out_dir)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise UserError(f"{path}: transformers cannot read its GGUF tokenizer ({e})") from None
    tok.save_pretrained(str(out_dir))


_CHILD = """
import sys
from pathlib import Path
from mlx_kto.model.gguf_tokenizer import save_tokenizer
from mlx_kto.errors import UserError
try:
    save_tokenizer(Path(sys.argv[1]), Path(sys.argv[2]))
except UserError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def _save_tokenizer_in_child(path: Path, out_dir: Path) -> None:
    """`save_tokenizer` in a fresh interpreter (torch importable there); its one-line error
    comes back as this process's UserError."""
    cmd = [sys.executable, "-c", _CHILD, str(path), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 2:  # the child's UserError, as it worded it
        raise UserError(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise UserError(f"{path}: reading its GGUF tokenizer failed ({last})")


def _tokenizer_cache(path: Path) -> Path:
    """Cache folder of a GGUF file's converted tokenizer, keyed like the fingerprint's file
    memo by (real path, size, mtime_ns) plus the transformers version that converted it."""
    import transformers

    real = os.path.realpath(path)
    st = os.stat(real)
    key = f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}\0{MAPPING_VERSION}"
    digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
    return default_cache_dir() / "gguf_tokenizers" / digest


def tokenizer_dir(path: str | Path) -> Path:
    """A folder with the GGUF file's tokenizer as Hugging Face files, converted once by
    transformers (which re-parses the whole vocabulary: seconds) and then cached."""
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
