"""Reference fingerprints: one hash for "everything that decides a reference log-prob".

    fingerprint = blake2b(schema, mlx version, hash(config.json), hash(*.safetensors, *.py),
                          quantize bits + group size, dtype, starting adapter hash)

What goes in, and why:
- a GGUF base (`.gguf` file or Ollama blob) by its bytes, plus the GGUF -> MLX mapping version;
- the base model's `config.json` and every `*.safetensors` / `*.py` file of its folder, by
  content (not by path: a moved or re-downloaded model still hits; a re-saved one with other
  weights misses). Tokenizer files are left out on purpose: they change token ids, and token
  ids are already part of every entry's key.
- `quantize` bits and `q_group_size` (only when quantizing at load) and `dtype`: they change
  the weights actually used.
- the starting adapter (`init_adapter`): `adapters.safetensors` by content, plus the fields of
  `adapter_config.json` that change its output (fine_tune_type, num_layers, rank, scale, keys;
  not dropout: the reference runs in eval mode).
- `SCHEMA` (bumped when the log-prob computation changes) and the MLX version (numerics).
Left out: `max_length`, the tokenizer, the data, seeds, batch size, beta, learning rate. The
first two only change token ids (covered by the key); the rest do not change the value.

Hashing a 4 GB model costs seconds, so file digests are memoised by (path, size, mtime_ns)
in the cache (any object with `lookup`/`store`, see `FileMemo`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mlx_kto.errors import UserError
from mlx_kto.model.gguf import MAPPING_VERSION
from mlx_kto.model.ollama import is_gguf_file

SCHEMA = "mlx_kto.reference.scorer/1"  # bump when sequence_logps or the reference mode changes
WEIGHT_SUFFIXES = (".safetensors", ".py")
_CHUNK = 1 << 22  # 4 MiB reads


class FileMemo(Protocol):
    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None: ...

    def store(self, path: str, size: int, mtime_ns: int, digest: str) -> None: ...


def file_digest(path: str | Path, memo: FileMemo | None = None) -> str:
    """blake2b-256 hex digest of a file's bytes, memoised by (real path, size, mtime_ns)."""
    real = os.path.realpath(path)  # HF cache files are symlinks to blobs
    st = os.stat(real)
    if memo is not None:
        hit = memo.lookup(real, st.st_size, st.st_mtime_ns)
        if hit is not None:
            return hit
    h = hashlib.blake2b(digest_size=32)
    with open(real, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if memo is not None:
        memo.store(real, st.st_size, st.st_mtime_ns, digest)
    return digest


def weights_digest(model_path: str | Path, memo: FileMemo | None = None) -> str:
    """Content hash of a model folder's config.json, weight files and code (not tokenizer);
    of a GGUF file (.gguf, or an Ollama blob): its bytes (weights, config and tokenizer in
    one) and the version of our GGUF -> MLX mapping."""
    folder = Path(model_path)
    if folder.is_file() and is_gguf_file(folder):  # by magic too: an Ollama blob has no suffix
        h = hashlib.blake2b(digest_size=32)
        h.update(f"{MAPPING_VERSION}\0{file_digest(folder, memo)}\0".encode())
        return h.hexdigest()
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: not a model folder (no config.json)")
    names = sorted(
        p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES
    )
    h = hashlib.blake2b(digest_size=32)
    for name in names:
        h.update(f"{name}\0{file_digest(folder / name, memo)}\0".encode())
    return h.hexdigest()


def adapter_digest(adapter_dir: str | Path, memo: FileMemo | None = None) -> str:
    """Content hash of an mlx-lm adapter folder: its weights and output-relevant config."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / "adapters.safetensors"
    conf_path = adapter_dir / "adapter_config.json"
    if not weights.exists() or not conf_path.exists():
        raise UserError(f"--init-adapter: {adapter_dir} is not an mlx-lm adapter folder")
    conf = json.loads(conf_path.read_text())
    lp = {k: v for k, v in conf.get("lora_parameters", {}).items() if k != "dropout"}
    relevant = {
        "fine_tune_type": conf.get("fine_tune_type", "lora"),
        "num_layers": conf.get("num_layers"),
        "lora_parameters": lp,
    }
    h = hashlib.blake2b(digest_size=32)
    h.update(file_digest(weights, memo).encode())
    h.update(json.dumps(relevant, sort_keys=True).encode())
    return h.hexdigest()


@dataclass
class Fingerprint:
    id: str  # hex digest: the first part of every cache key
    info: dict = field(default_factory=dict)  # what went into it (shown by `mlx-kto cache info`)


def reference_fingerprint(
    model_path: str | Path,
    quantize: int | None = None,
    q_group_size: int = 64,
    dtype: str | None = None,
    init_adapter: str | Path | None = None,
    memo: FileMemo | None = None,
) -> Fingerprint:
    """The fingerprint of the reference model (see the module docstring for what it covers)."""
    import mlx.core as mx

    info = {
        "schema": SCHEMA,
        "mlx": mx.__version__,
        "weights": weights_digest(model_path, memo),
        "quantize": quantize,
        "q_group_size": q_group_size if quantize else None,
        "dtype": dtype,
        "adapter": adapter_digest(init_adapter, memo) if init_adapter else None,
    }
    digest = hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=32).hexdigest()
    # Human-readable extras (not hashed: moving the model must not change the fingerprint).
    shown = {**info, "model": str(model_path), "init_adapter": str(init_adapter or "") or None}
    return Fingerprint(digest, shown)
