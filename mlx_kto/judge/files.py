"""The judge's files: report files written atomically with the permissions the user's umask
asks for (a thin layer over `mlx_kto.runtime.atomic`: temp file beside the target, fsync,
rename; 0666 & ~umask), and text files read or refused in one line."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_with
from mlx_kto.runtime.outputs import make_parent


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it into place (the folder is
    created first). The temp name keeps `path`'s suffix, so matplotlib picks the format."""
    path = Path(path)
    make_parent(path)
    atomic_write_with(path, lambda tmp: write(str(tmp)), suffix=path.suffix)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_text(path: str | Path) -> str:
    """The UTF-8 text of `path`, or one line naming the file (and the line of a byte that
    is not UTF-8)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None
