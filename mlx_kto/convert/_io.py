"""Atomic file writes and output-folder checks shared by the converters."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from mlx_kto.errors import UserError


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place, so a
    crash never leaves a half-written file. `suffix` keeps writers that append an
    extension (mx.save_safetensors adds `.safetensors`) writing where we expect."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda p: p.write_text(text))


def prepare_out_dir(out: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """An output folder that exists and is empty; a non-empty one only with `overwrite`
    (stale files from another conversion would otherwise be mixed in silently). With
    `overwrite` nothing is deleted: the files we write replace their namesakes."""
    out = Path(out)
    if any(out.resolve() == Path(i).resolve() for i in inputs):
        raise UserError(f"{out}: is an input folder; choose another output")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out}: folder exists and is not empty (pass --overwrite to write into it)"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_out_file(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder, expected a file path")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: file exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
