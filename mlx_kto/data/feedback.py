"""The feedback file: durable, concurrent appends of ratings, and retractions (undo).

A rating is one JSON line that `mlx-kto train` reads as is:

    {"id": "...", "prompt": [msgs], "completion": [{"role": "assistant", ...}],
     "label": true, "meta": {"model": ..., "adapter": ..., "sampling": {...}, "time": ...}}

Undo appends a retraction line, `{"retract": "<id>", "time": ...}`; the loader
(`drop_retracted`) removes the retracted rating. The file is only ever appended to,
so an undo is as durable as a rating and never races another writer's rename.

Durability of `append_row` (what "acknowledged" means): the whole line is one
`write()` on an `O_APPEND` descriptor under an exclusive `flock`, then `fsync` of
the file (and of its folder when the call created the file). Only after that does
the caller show the rating as saved. So an acknowledged rating survives kill -9 and
power loss; two processes never interleave bytes; a process killed mid-write leaves
at most one torn final line, which the next append repairs (drops it, since it was
never acknowledged) and the reader skips with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

log = logging.getLogger("mlx_kto")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rating_row(
    prompt: list[dict], reply: str, label: bool, meta: dict[str, Any] | None = None
) -> dict:
    """One rating in the training format (conversational prompt/completion/label)."""
    return {
        "id": uuid.uuid4().hex,
        "prompt": [dict(m) for m in prompt],
        "completion": [{"role": "assistant", "content": reply}],
        "label": bool(label),
        "meta": {"time": now_iso(), **(meta or {})},
    }


def retraction_row(rating_id: str) -> dict:
    return {"retract": rating_id, "time": now_iso()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _repair_torn_tail(fd: int, path: Path) -> None:
    """Under the lock: if the file does not end in a newline, its last line was torn
    by a writer that died mid-write (never acknowledged). Drop it, unless it is a
    complete JSON object someone saved without a final newline; then add one."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    window = 1 << 16
    while True:  # widen the window until it holds the start of the unterminated line
        start = max(0, size - window)
        tail = os.pread(fd, size - start, start)
        cut = tail.rfind(b"\n") + 1  # 0: no newline in the window
        if cut > 0 or start == 0:
            break
        window *= 4
    fragment = tail[cut:]
    try:
        json.loads(fragment)
        os.write(fd, b"\n")
        return
    except ValueError:
        pass
    os.ftruncate(fd, start + cut)
    log.warning(
        "%s: dropped a torn last line (%d bytes, an unacknowledged write that was cut off)",
        path,
        len(fragment),
    )


def append_row(path: str | Path, row: dict) -> None:
    """Append one JSON line durably (see the module docstring); returns once on disk."""
    path = Path(path)
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    created = not path.exists()
    if created and not path.parent.exists():
        raise UserError(f"feedback: folder {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"feedback: cannot open {path} for appending ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # serialises with other mlx-kto writers
        _repair_torn_tail(fd, path)
        n = os.write(fd, data)  # O_APPEND: one write lands at the end, whole
        if n != len(data):  # disk full: undo the partial line rather than leave it torn
            os.ftruncate(fd, os.fstat(fd).st_size - n)
            raise UserError(f"feedback: short write to {path} (disk full?); not saved")
        os.fsync(fd)
    except OSError as e:  # ENOSPC, EIO, ...: the rating is not acknowledged
        raise UserError(f"feedback: could not write {path} ({e.strerror}); not saved") from None
    finally:
        os.close(fd)  # releases the lock
    if created:
        _fsync_dir(path.parent)  # the new directory entry must survive power loss too


def drop_retracted(rows: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """Rows minus retraction lines and the ratings they retract (by "id").

    `rows` are (raw row, "path:line") pairs; a retraction of an id that is not in the
    file is reported and ignored (nothing to remove). Ids are strings: a retraction
    naming anything else, or (in a file with retractions) a rating whose "id" is a
    list or object, is an error naming its line."""
    retracted: dict[str, str] = {}
    for row, where in rows:
        if isinstance(row, dict) and "retract" in row:
            rid = row["retract"]
            if not isinstance(rid, str) or not rid:
                raise UserError(
                    f"{where}: 'retract' must be the id (a string) of a rating, not {describe_value(rid)}"
                )
            retracted[rid] = where
    if not retracted:
        return rows
    ids: set[str] = set()
    for r, where in rows:
        rid = r.get("id") if isinstance(r, dict) and "retract" not in r else None
        if isinstance(rid, str):
            ids.add(rid)
        elif isinstance(rid, (list, dict)):  # a number or null just cannot be retracted
            raise UserError(
                f"{where}: 'id' must be the rating's id (a string), not {describe_value(rid)}"
            )
    for rid, where in retracted.items():
        if rid not in ids:
            log.warning(
                "%s: retraction of id %r matches no rating in the file; ignored", where, rid
            )
    return [
        (r, w)
        for r, w in rows
        if not (isinstance(r, dict) and ("retract" in r or _str_id(r) in retracted))
    ]


def _str_id(row: dict) -> str | None:
    rid = row.get("id")
    return rid if isinstance(rid, str) else None


def describe_value(value: Any) -> str:
    """How an error names a wrong value: its JSON type (and the value, when short)."""
    if value is None or value == "":
        return "null" if value is None else "an empty string"
    name = {list: "a list", dict: "an object", bool: "a boolean", str: "a string"}.get(
        type(value), "a number"
    )
    return f"{name} ({json.dumps(value, default=str)[:40]})"


def read_ratings(path: str | Path) -> list[dict]:
    """The live ratings of a feedback file (retractions applied), oldest first, as
    raw rows; torn or unparsable lines are skipped (this is for display)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        try:
            rows.append((json.loads(line), f"{path}:{i + 1}"))
        except ValueError:
            continue
    return [r for r, _ in drop_retracted(rows) if isinstance(r, dict) and "label" in r]
