"""Where a command may write: the one check every command that writes a file or a folder
of files runs before any work (convert, compare, plot, data import).

A path under a file, a folder where a file is expected, an unwritable folder, or an
existing output the user did not ask to replace is one line naming the path and the flag
that would allow it; nothing is created, replaced or deleted on the way."""

from __future__ import annotations

import os
from pathlib import Path

from mlx_kto.errors import UserError


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
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{named}: cannot write ({folder} is not writable)")


def make_parent(out: Path) -> None:
    """Create `out`'s parent folders, or say in one line why they cannot be."""
    make_folder(out.parent, out)


def check_out_file(out: str | Path, overwrite: bool, flag: str = "--overwrite") -> Path:
    """A file path to write: not a folder, not an existing file unless `overwrite` (`flag`
    allows it), its folder created and writable."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{out}: is a folder, expected a file path")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: file exists (pass {flag} to replace it)")
    make_parent(out)
    return out


def check_out_files(
    folder: str | Path, names: tuple[str, ...], overwrite: bool, flag: str = "--overwrite"
) -> Path:
    """A folder to write the files `names` into: not a file; a file of those names there
    already only with `overwrite` (other files in it are left alone); created if missing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder}: exists and is not a folder (the output is a folder of files)")
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if any((folder / n).is_dir() for n in taken):
        raise UserError(f"{folder}: {', '.join(taken)} is a folder; choose another output folder")
    if taken and not overwrite:
        raise UserError(
            f"{folder}: holds {', '.join(taken)} from an earlier run "
            f"(pass {flag} to replace them, or choose another folder)"
        )
    make_folder(folder)
    return folder
