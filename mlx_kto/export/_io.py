"""Atomic file writes, output-folder checks and JSON reading shared by the converters."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_with


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


def check_out_file(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder, expected a file path")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: file exists (pass --overwrite to replace it)")
    make_parent(out)
    return out


def make_parent(out: Path) -> None:
    """Create `out`'s parent folders, or say in one line why they cannot be."""
    make_folder(out.parent, out)


def make_folder(folder: Path, named: Path | None = None) -> None:
    """mkdir -p `folder`; a file in the way or a failure is one line naming `named`."""
    named = named or folder
    for p in [folder, *folder.parents]:
        if p.exists() and not p.is_dir():
            raise UserError(f"{named}: cannot write ({p} is a file, not a folder)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{named}: cannot create {folder} ({e.strerror or e})") from None
