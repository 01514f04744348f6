"""Hugging Face checkpoint -> MLX folder, optionally quantized (mlx-lm's own conversion)."""

from __future__ import annotations

from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export.base import resolve_local
from mlx_kto.export.tokenizer_files import copy_tokenizer_files

Q_BITS = (2, 3, 4, 5, 6, 8)
Q_GROUP_SIZES = (32, 64, 128)
DTYPES = ("float16", "bfloat16", "float32")


def hf_to_mlx(
    model: str,
    out_dir: str | Path,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: str | None = None,
) -> Path:
    """Convert a Hugging Face checkpoint (folder or hub id) to an MLX folder with
    `mlx_lm.convert`, quantized (affine, `q_bits`, `q_group_size`) when `quantize`.
    `dtype` casts the float weights (default: the checkpoint's `torch_dtype`). A model
    quantized here can be trained as QLoRA; fuse it later with --dequantize. The
    tokenizer files are the source's, unchanged (tokenizer.model included)."""
    from mlx_lm.convert import convert

    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out}: already exists (mlx-lm refuses to write into it)")
    for parent in out.parents:  # before any download or conversion work
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{out}: cannot write ({parent} is a file, not a folder)")
    if q_bits not in Q_BITS:
        raise UserError(f"--q-bits {q_bits}: expected one of {Q_BITS}")
    if q_group_size not in Q_GROUP_SIZES:
        raise UserError(f"--q-group-size {q_group_size}: expected one of {Q_GROUP_SIZES}")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = Path(model).expanduser()
    if src.exists() and not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (not a Hugging Face model folder)")
    looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1
    if not src.exists() and (looks_local or (src.parent.name and src.parent.is_dir())):
        # a path, not owner/name: say it is missing (mlx-lm would complain about hub syntax)
        raise UserError(f"{model}: no such folder")
    try:
        convert(
            str(src) if src.exists() else model,
            mlx_path=str(out),
            quantize=quantize,
            q_group_size=q_group_size if quantize else None,
            q_bits=q_bits if quantize else None,
            dtype=dtype,
        )
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        where = model if src.exists() else f"{model} (no local folder of that name; hub)"
        raise UserError(f"hf-to-mlx {where}: {str(e).splitlines()[0] if str(e) else e}") from None
    # mlx-lm re-saves the tokenizer through transformers; keep the source's files instead.
    local = src if src.exists() else resolve_local(model)
    if local is not None:
        copy_tokenizer_files(local, out, replace=True)
    return out
