"""The run folder: refuse to mix two runs in one, start cleanly on `--overwrite`, and turn
file-system failures (not a folder, read-only, disk full) into one line naming the path.

A run folder holds (RUN_FILES): adapters.safetensors, adapter_config.json, kto_config.json,
metrics.jsonl, training.png and checkpoints/. Only those names are ever removed; anything
else the user keeps there is left alone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_bytes, write_errors
from mlx_kto.train.checkpoint import list_checkpoints

RUN_FILES = (
    "checkpoints",  # first: once it is gone, nothing can --resume the old run
    "adapters.safetensors",
    "adapter_config.json",
    "kto_config.json",
    "metrics.jsonl",
    "training.png",
)


def existing_run_files(run_dir: str | Path) -> list[str]:
    """The RUN_FILES present in run_dir (a previous run's output). A checkpoints folder
    counts only if it holds a finished checkpoint (not just the temp folder of a killed save)."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if "checkpoints" in found:
        if not list_checkpoints(run_dir):
            found.remove("checkpoints")
    return found


def clear_run(run_dir: str | Path) -> None:
    """Remove a previous run's files (errors: one line naming the folder). Each is first
    renamed into one hidden folder (a rename is atomic: no half-removed checkpoint is ever
    visible), which is then deleted."""
    run_dir = Path(run_dir)
    names = existing_run_files(run_dir)
    if not names:
        return
    with write_errors(run_dir):
        _move_away(run_dir, names)


def _move_away(run_dir: Path, names: list[str]) -> None:
    trash = Path(tempfile.mkdtemp(dir=run_dir, prefix=".overwritten-"))
    for name in names:
        os.replace(run_dir / name, trash / name)
    for old in run_dir.glob(".overwritten-*"):  # this one, and any an earlier crash left
        shutil.rmtree(old, ignore_errors=True)


def prepare_run_dir(run_dir: str | Path, overwrite: bool = False, resuming: bool = False) -> Path:
    """Create run_dir (and parents) and check it is a writable folder. A folder holding a
    previous run is refused unless `resuming` (continue it) or `overwrite` (the caller
    removes its run files with `clear_run` once the new run's inputs have loaded, so a
    mistyped flag never costs the old run)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"adapter_path: {run_dir} exists and is not a folder")
    with write_errors(run_dir):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # a parent is a file
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(run_dir)) from e
        fd, probe = tempfile.mkstemp(dir=run_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    found = existing_run_files(run_dir)
    if found and not resuming and not overwrite:
        raise UserError(
            f"adapter_path: {run_dir} already holds a run ({', '.join(found)}); continue "
            "it with --resume, start afresh with --overwrite, or choose another --adapter-path"
        )
    return run_dir


# -- metrics.jsonl --------------------------------------------------------------------------


def read_metrics(path: str | Path, max_step: int | None = None) -> list[str]:
    """The lines of a metrics.jsonl that parse, with step <= max_step. A line that does not
    parse (a write torn by a crash or a full disk) is dropped."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and (max_step is None or rec.get("step", 0) <= max_step):
            out.append(line)
    return out


def truncate_metrics(path: str | Path, max_step: int) -> None:
    """On resume: keep only the records of steps the checkpoint reached (atomic rewrite)."""
    path = Path(path)
    with write_errors(path):
        atomic_write_bytes(path, "".join(k + "\n" for k in read_metrics(path, max_step)).encode())
