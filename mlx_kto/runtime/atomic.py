"""Atomic writes (temp file + rename) that respect the umask and leave no strays.

`tempfile.mkstemp`/`mkdtemp` create 0600/0700 entries, which a rename then
publishes: adapters nobody else on the machine can read. Here temp files are
created like any file (mode 0666 & ~umask, folders 0777 & ~umask), removed on any
exception, and named `.NAME.tmp-PID-RANDOM` so that the next write of NAME removes
those left by a process that no longer runs (a SIGKILL leaves no chance to clean).
A failed write (disk full, read-only folder, a file where a folder should be)
becomes a one-line UserError naming the path.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_kto.errors import UserError

_TMP = ".tmp-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def umask() -> int:
    """The process umask: from /proc on Linux, else by setting and restoring it (POSIX
    has no getter; the brief swap could race a file created by another thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_new(path: str | Path, folder: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would have: 0666 (0777) & ~umask."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def temp_path(path: Path, suffix: str = "") -> Path:
    """`.NAME.tmp-PID-RANDOM[suffix]` beside `path`."""
    return path.with_name(f".{path.name}{_TMP}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_stale_temps(path: Path) -> int:
    """Remove temp files/folders of `path` left by processes that are gone; returns how many."""
    return clean_stale_temps_in(path.parent, f".{path.name}{_TMP}")


def clean_stale_temps_in(folder: Path, prefix: str = ".") -> int:
    """Remove every `.NAME.tmp-PID-*` in `folder` (names starting with `prefix`) whose
    process is gone; returns how many."""
    n = 0
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return 0
    for p in entries:
        if not p.name.startswith(prefix) or _TMP not in p.name:
            continue
        pid = p.name.rsplit(_TMP, 1)[1].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            n += 1
        except OSError:
            pass
    return n


def write_error(path: Path, e: Exception) -> UserError:
    """One line for a failed write: `out/adapters.safetensors: cannot write (No space left...)`."""
    why = getattr(e, "strerror", None) or str(e)
    try:
        if shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 2**20:
            why += "; the disk is full"
    except OSError:
        pass
    return UserError(f"{path}: cannot write ({why})")


def _is_write_failure(e: RuntimeError) -> bool:
    """MLX reports file errors as RuntimeError: `[write] Unable to write ...`, `Failed to open`."""
    msg = str(e)
    return msg.startswith("[write]") or "Unable to write" in msg or "Failed to open" in msg


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()
    except OSError:
        pass


def atomic_write_with(path: str | Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Call `write(tmp)` on a fresh temp path beside `path`, fsync it, rename it into place.
    `suffix` keeps writers that append an extension (mx.save_safetensors adds
    `.safetensors`) writing where we expect. `path` is untouched unless all succeeded."""
    path = Path(path)
    if not path.parent.is_dir():
        what = "is not a folder" if path.parent.exists() else "does not exist"
        raise UserError(f"{path}: cannot write ({path.parent} {what})")
    clean_stale_temps(path)
    tmp = temp_path(path, suffix)
    try:
        write(tmp)
        chmod_like_new(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from None
    except RuntimeError as e:
        _remove(tmp)
        if _is_write_failure(e):
            raise write_error(path, e) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (a reader sees the old or the new file)."""
    atomic_write_with(path, lambda p: p.write_bytes(data))


# -- one line for a failed write ----------------------------------------------------------


def describe_os_error(path: str | Path, e: OSError) -> str:
    """One line for an OSError while writing `path`."""
    if e.errno in _DISK_FULL:
        return f"{path}: disk full ({e.strerror}); free some space"
    if e.errno in _NOT_WRITABLE:
        return f"{path}: not writable ({e.strerror})"
    if e.errno == errno.ENOTDIR:
        return f"{path}: a parent of this path is a file, not a folder"
    if e.errno == errno.EEXIST:
        return f"{path}: exists and is not a folder"
    return f"{path}: cannot write ({e.strerror or e})"


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Inside, an OSError from writing becomes a UserError naming `path` (or the file the
    error names): disk full, read-only, not a folder."""
    try:
        yield
    except OSError as e:
        raise UserError(describe_os_error(e.filename or path, e)) from None


def write_json(path: Path, obj) -> None:
    """Atomic JSON file (temp file + rename), errors as one line naming the path."""
    with write_errors(path):
        atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def check_safetensors_size(path: str | Path) -> None:
    """Raise OSError(ENOSPC) when a just-written .safetensors file is shorter than its own
    header says: mx.save_safetensors does not report a failed write (e.g. a full disk)."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= size else None
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
        ok = size >= 8 + n + end
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise OSError(errno.ENOSPC, "short write (disk full?)", str(path))


def append_line(f, path: str | Path, line: str) -> None:
    """Append one line to the open file `f` and flush; on failure the file is cut back to
    where it was (no torn line) and the error names `path`."""
    pos = os.fstat(f.fileno()).st_size  # flushed after every line: nothing buffered
    try:
        f.write(line)
        f.flush()
    except OSError as e:
        try:
            os.ftruncate(f.fileno(), pos)
        except OSError:
            pass
        raise UserError(describe_os_error(path, e)) from None
