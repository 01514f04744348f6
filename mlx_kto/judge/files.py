"""Atomic writes of report files with the permissions the user's umask asks for: a thin
layer over `mlx_kto.runtime.atomic` (temp file beside the target, fsync, rename; 0666 & ~umask)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_kto.runtime.atomic import atomic_write_with


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it into place (the folder is
    created first). The temp name keeps `path`'s suffix, so matplotlib picks the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: write(str(tmp)), suffix=path.suffix)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
