"""RefCache: content-keyed reference log-probs on disk (SQLite, WAL mode).

Storage: one SQLite file (standard library) in WAL mode. Why SQLite rather than append-only
shards + an index: a transaction per step is atomic (a crash or SIGKILL loses at most the
step in flight, never leaves a half entry); SQLite's file locks let several processes read and
write the same cache safely; point lookups by key are indexed; and there is no compaction or
index rebuild to write. Each value also carries its own checksum (blake2b of key + payload),
because SQLite does not checksum pages: a value changed on disk is detected, not used, and
recomputed. A file SQLite cannot read at all is moved aside and a fresh cache started.
Caveat: like any SQLite WAL database, the folder must be on a local file system (not NFS).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import struct
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.ollama import is_gguf_file
from mlx_kto.reference.fingerprint import Fingerprint, weights_digest
from mlx_kto.runtime.paths import default_cache_dir
from mlx_kto.runtime.switches import CACHE_DIR

import numpy as np

DB_NAME = "reference.sqlite"
FORMAT = "1"  # on-disk layout version (the meta table)
_PAYLOAD = struct.Struct("<fI")  # float32 log-prob, uint32 completion-token count
_SUM_BYTES = 8
_IN_CHUNK = 500  # keys per SELECT ... IN (...)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fingerprints (
    id INTEGER PRIMARY KEY, fp TEXT UNIQUE NOT NULL, info TEXT NOT NULL,
    created REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    key BLOB PRIMARY KEY, fp INTEGER NOT NULL, val BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_hashes (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, digest TEXT NOT NULL);
"""


def entry_key(fingerprint: str, ids: Sequence[int] | np.ndarray, start: int) -> bytes:
    """Content key of one sequence: its token ids (up to the completion end) and completion
    start, under one reference fingerprint (hex)."""
    arr = np.asarray(ids, dtype="<i4")
    h = hashlib.blake2b(digest_size=32)
    h.update(bytes.fromhex(fingerprint))
    h.update(struct.pack("<qq", int(start), arr.size))
    h.update(arr.tobytes())
    return h.digest()


def _pack_value(key: bytes, logp: float, ntoks: int) -> bytes:
    payload = _PAYLOAD.pack(logp, ntoks)
    return payload + hashlib.blake2b(key + payload, digest_size=_SUM_BYTES).digest()


def _unpack_value(key: bytes, val: bytes) -> tuple[float, int] | None:
    """(logp, ntoks), or None when the stored bytes fail their checksum or hold a
    non-finite log-prob (never a valid reference: treated as a corrupt entry)."""
    n = _PAYLOAD.size
    if not isinstance(val, bytes) or len(val) != n + _SUM_BYTES:
        return None
    payload, check = val[:n], val[n:]
    if hashlib.blake2b(key + payload, digest_size=_SUM_BYTES).digest() != check:
        return None
    logp, ntoks = _PAYLOAD.unpack(payload)
    return (logp, ntoks) if math.isfinite(logp) else None


def _is_corruption(e: sqlite3.DatabaseError) -> bool:
    name = getattr(e, "sqlite_errorname", "")
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    msg = str(e).lower()
    return "malformed" in msg or "not a database" in msg


class RefCache:
    """Content-keyed store of reference sequence log-probs (float32) and token counts.

    Safe to share between processes (SQLite locking, WAL). Cache failures never stop
    training: a broken or locked cache is reported once and then skipped."""

    def __init__(self, root: str | Path | None = None, timeout: float = 60.0, log=None):
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.path = self.root / DB_NAME
        self.timeout = timeout
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.corrupt = 0  # entries that failed their checksum (recomputed by the caller)
        self.broken = False  # set after an unrecoverable error: acts as an empty cache
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as e:
            if not _is_corruption(e):
                raise
            self._quarantine(e)
            self.db = self._open()

    # -- set-up -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        """`_connect`, retried while another process holds the lock: SQLite does not always
        wait on its busy timeout when two processes switch a new file to WAL at once."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self._connect()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: every commit is atomic; a power cut (not a process kill)
            # may lose the last commits, which are recomputable.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
            fmt = db.execute("SELECT v FROM meta WHERE k='format'").fetchone()[0]
        except BaseException:
            db.close()
            raise
        if fmt != FORMAT:
            db.close()
            raise sqlite3.DatabaseError(f"cache format {fmt}, expected {FORMAT}: not a database")
        return db

    def _quarantine(self, err: Exception) -> None:
        """Move an unreadable cache file aside (kept for inspection) and start afresh."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            p = Path(str(self.path) + suffix)
            if p.exists():
                os.replace(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
        self.log(f"warning: reference cache {self.path} was unreadable ({err}); moved aside")

    def _fail(self, err: Exception) -> None:
        if not self.broken:
            self.log(f"warning: reference cache {self.path} disabled for this run ({err})")
        self.broken = True

    def close(self) -> None:
        self.db.close()

    # -- file-digest memo (fingerprint.FileMemo) -------------------------------------------
    def lookup(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute(
            "SELECT digest FROM file_hashes WHERE path=? AND size=? AND mtime_ns=?",
            (path, size, mtime_ns),
        ).fetchone()
        return row[0] if row else None

    def store(self, path: str, size: int, mtime_ns: int, digest: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)", (path, size, mtime_ns, digest)
        )

    # -- entries ----------------------------------------------------------------------------
    def register(self, fingerprint: Fingerprint | str) -> int:
        """Row id of a fingerprint (created on first use); records what went into it."""
        fp = fingerprint if isinstance(fingerprint, Fingerprint) else Fingerprint(fingerprint)
        now = time.time()
        self.db.execute(
            "INSERT INTO fingerprints (fp, info, created, last_used) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(fp) DO UPDATE SET info=excluded.info, last_used=excluded.last_used",
            (fp.id, json.dumps(fp.info, sort_keys=True), now, now),
        )
        return self.db.execute("SELECT id FROM fingerprints WHERE fp=?", (fp.id,)).fetchone()[0]

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, tuple[float, int]]:
        """{key: (logp, ntoks)} for the keys present and intact; corrupt ones are left out
        (and counted in `self.corrupt`) so the caller recomputes and overwrites them."""
        keys = list(dict.fromkeys(keys))
        out: dict[bytes, tuple[float, int]] = {}
        if self.broken or not keys:
            return out
        corrupt_before = self.corrupt
        try:
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = keys[i : i + _IN_CHUNK]
                q = f"SELECT key, val FROM entries WHERE key IN ({','.join('?' * len(chunk))})"
                for key, val in self.db.execute(q, chunk):
                    v = _unpack_value(key, val)
                    if v is None:
                        self.corrupt += 1
                    else:
                        out[key] = v
        except sqlite3.DatabaseError as e:
            self._fail(e)
            return {}
        if self.corrupt > corrupt_before:
            n = self.corrupt - corrupt_before
            self.log(f"warning: {n} corrupt reference cache entries ignored (recomputed)")
        return out

    def put_many(self, fp_id: int, items: Sequence[tuple[bytes, float, int]]) -> None:
        """Store (key, logp, ntoks) items in one transaction: all or none survive a crash.
        Non-finite log-probs are never stored (they would poison every later run)."""
        rows = [(k, fp_id, _pack_value(k, logp, n)) for k, logp, n in items if math.isfinite(logp)]
        if self.broken or not rows:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?)", rows)
                self.db.execute(
                    "UPDATE fingerprints SET last_used=? WHERE id=?", (time.time(), fp_id)
                )
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:  # locked past the timeout, disk full, corrupt
            self._fail(e)

    # -- maintenance (mlx-kto cache ...) --------------------------------------------------
    def info(self) -> dict:
        """Location, size on disk, entry count and per-fingerprint counts."""
        size = sum(
            Path(str(self.path) + s).stat().st_size
            for s in ("", "-wal")
            if Path(str(self.path) + s).exists()
        )
        counts = dict(self.db.execute("SELECT fp, count(*) FROM entries GROUP BY fp"))
        fps = []
        for fid, fp, info, created, last in self.db.execute(
            "SELECT id, fp, info, created, last_used FROM fingerprints ORDER BY last_used DESC"
        ):
            fps.append(
                {
                    "id": fid,
                    "fingerprint": fp,
                    "entries": counts.get(fid, 0),
                    "created": created,
                    "last_used": last,
                    **json.loads(info),
                }
            )
        return {
            "path": str(self.path),
            "bytes": size,
            "entries": sum(counts.values()),
            "fingerprints": fps,
        }

    def fingerprint_ids_for_model(self, model: str) -> list[int]:
        """Fingerprints recorded for a model: by weight content when `model` is a local folder
        or GGUF file (an Ollama blob too), else by the recorded path / hub id."""
        digest = None
        p = Path(model).expanduser()
        if (p / "config.json").exists() or (p.is_file() and is_gguf_file(p)):
            digest = weights_digest(p, self)
        hub = "models--" + model.replace("/", "--") if model.count("/") == 1 else None
        ids = []
        for fid, info in self.db.execute("SELECT id, info FROM fingerprints"):
            info = json.loads(info)
            recorded = str(info.get("model", ""))
            if (
                (digest is not None and info.get("weights") == digest)
                or recorded in (model, str(p), str(p.resolve()))
                or (hub is not None and hub in recorded)
            ):
                ids.append(fid)
        return ids

    def clear(self, fingerprint_ids: Sequence[int] | None = None) -> int:
        """Delete all entries (or those of the given fingerprints); returns how many."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if fingerprint_ids is None:
                n = self.db.execute("DELETE FROM entries").rowcount
                self.db.execute("DELETE FROM fingerprints")
            else:
                n = 0
                for fid in fingerprint_ids:
                    n += self.db.execute("DELETE FROM entries WHERE fp=?", (fid,)).rowcount
                    self.db.execute("DELETE FROM fingerprints WHERE id=?", (fid,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        try:  # give the space back; skipped while another process is reading
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:
            pass
        return n


def cache_source(root: str | Path | None) -> str:
    """How the user named the cache folder: `--ref-cache X`, `MLX_KTO_CACHE_DIR=X` or the default."""
    if root:
        return f"--ref-cache {root}"
    if CACHE_DIR.is_set():
        return f"{CACHE_DIR.name}={CACHE_DIR.raw()}"
    return str(default_cache_dir())


def check_cache_root(root: str | Path | None) -> None:
    """UserError if the cache folder (or a parent) is an existing non-folder."""

    path = Path(root).expanduser() if root else default_cache_dir()
    for p in [path, *path.parents]:
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is under {p}, a file"
            raise UserError(
                f"{cache_source(root)}: the reference cache folder {what}; point it at a folder"
            )
