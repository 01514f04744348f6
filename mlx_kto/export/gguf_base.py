"""GGUF base models for the converters: the shapes an adapter is checked against, and a GGUF
file written out as an mlx-lm folder (`mlx-kto convert gguf-to-mlx`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import atomic_write, atomic_write_json, prepare_out_dir
from mlx_kto.export.base import BaseModel, _kind
from mlx_kto.model.gguf import (
    ARCHES,
    _lazy_model,
    build_model,
    read_config,
    read_gguf,
    requantize_line,
)
from mlx_kto.model.gguf_reader import meta, read_header
from mlx_kto.model.gguf_tokenizer import tokenizer_dir

import mlx.core as mx
from mlx.utils import tree_flatten


def describe(path: str | Path):
    """(BaseModel, GGUF 2-D tensor name -> ggml ne, architecture, q/k permuted) of a GGUF
    base, for converters that check an adapter against it (no weights are read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--base {path}: no such GGUF file")
    reader = read_header(path)
    config = read_config(path, reader)
    model = _lazy_model(config)
    info = BaseModel(
        ref=str(path),
        path=path,
        config=config,
        shapes={k: tuple(v.shape) for k, v in tree_flatten(model.parameters())},
        kinds={name: _kind(m) for name, m in model.named_modules() if name},
        n_layers=len(model.layers),
    )
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors if len(t.shape) == 2}
    arch = meta(reader, "general.architecture")
    return info, tensors, arch, ARCHES[arch].permute_qk


def gguf_to_mlx(
    path: str | Path,
    out: str | Path,
    quantize: int | None = None,
    q_group_size: int = 64,
    dtype: str | None = None,
    overwrite: bool = False,
    log=print,
) -> Path:
    """Write an mlx-lm folder (config.json, model.safetensors, tokenizer files) for a GGUF
    file; `mlx_lm.load(OUT)` then gives the same model as `--model FILE.gguf`. `dtype`
    (float16 / bfloat16 / float32): dtype of dequantized tensors (default float16)."""
    path = Path(path)
    out = prepare_out_dir(out, overwrite)
    base = read_gguf(path, getattr(mx, dtype or "float16"))
    model = build_model(base)
    for line in base.report():
        log(f"{path.name}: {line}")
    if quantize:
        log(requantize_line(path, model, base, quantize, q_group_size))
    weights = dict(tree_flatten(model.parameters()))
    for f in sorted(tokenizer_dir(path).iterdir()):
        if f.is_file():
            atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    atomic_write(
        out / "model.safetensors",
        lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}),
        suffix=".safetensors",
    )
    atomic_write_json(out / "config.json", {**base.config, "gguf_source": path.name})
    return out
