"""Atomic file writes, output-folder checks and JSON reading shared by the converters."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_with
from mlx_kto.runtime.outputs import check_out_file, make_folder, make_parent

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "check_out_file",
    "make_parent",
    "prepare_out_dir",
    "read_json_object",
]


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` (a config file), or one line saying why it is not one:
    unreadable, not UTF-8, invalid JSON (with the line), or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def atomic_write(path: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call `write(tmp)` on a temp file beside `path`, then rename it into place, so a
    crash never leaves a half-written file (mlx_kto.runtime.atomic: umask respected, strays of
    dead processes removed, a failed write is one line naming `path`)."""
    atomic_write_with(path, write, suffix)


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
    make_folder(out)
    return out
