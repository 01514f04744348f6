"""Feedback rows from columnar files and the Hugging Face hub.

- `.parquet` files and `.arrow` files (Arrow IPC, file or stream format) through pyarrow;
- folders written by `datasets`' `save_to_disk` (a `Dataset`: state.json + data-*.arrow,
  or a `DatasetDict`: dataset_dict.json + one such folder per split), read with pyarrow
  alone;
- a hub dataset id (`trl-lib/kto-mix-14k`) through `datasets.load_dataset` (the `hf` extra).

Every reader returns raw rows with their locations ("file[i]", "id:split[i]"), which
`mlx_kto.data.rows` validates like JSON rows. Arrow unifies the fields of a list of structs,
so a message gets `"tool_calls": None` when another one has tool calls: keys whose
value is None are dropped from messages (what a JSON row would have had).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".ndjson")  # JSON rows (mlx_kto.data.rows)
TABLE_EXTENSIONS = (".parquet", ".arrow")
HF_HINT = "pip install 'mlx-kto[hf]'"
# owner/name, as the hub spells ids; a path with a data file extension is never an id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MESSAGE_COLUMNS = ("messages", "prompt", "completion", "chosen", "rejected")


def _pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(
            f"reading parquet / arrow data needs pyarrow: pip install pyarrow (or {HF_HINT})"
        ) from None
    return pyarrow


def _clean(value: Any) -> Any:
    """Drop None-valued keys from the dicts of message lists (Arrow's unified structs)."""
    if isinstance(value, list):
        return [
            {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
            for m in value
        ]
    return value


def _rows_of(records: list[dict], where: str) -> list[tuple[Any, str]]:
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, dict):
            rec = {k: (_clean(v) if k in _MESSAGE_COLUMNS else v) for k, v in rec.items()}
        out.append((rec, f"{where}[{i}]"))
    return out


def read_arrow_table(path: Path):
    """A pyarrow Table from a .parquet or .arrow (IPC file or stream) file."""
    pa = _pyarrow()
    try:
        if path.suffix.lower() == ".parquet":
            return pa.parquet.read_table(path)
        try:
            with pa.ipc.open_file(path) as reader:
                return reader.read_all()
        except pa.ArrowInvalid:
            with pa.ipc.open_stream(path) as reader:  # what save_to_disk writes
                return reader.read_all()
    except (pa.ArrowInvalid, OSError) as e:
        msg = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a readable {path.suffix or 'arrow'} file ({msg})") from None


def read_table_rows(path: str | Path) -> list[tuple[Any, str]]:
    """Raw rows of a .parquet / .arrow file, located as "path[i]"."""
    path = Path(path)
    return _rows_of(read_arrow_table(path).to_pylist(), str(path))


# ---------------------------------------------------------------------------
# save_to_disk folders


def is_saved_dataset(folder: Path) -> bool:
    """A `save_to_disk` folder: a Dataset (state.json) or a DatasetDict (dataset_dict.json)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _saved_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    except RecursionError:
        raise UserError(
            f"{path}: not a datasets save_to_disk file (JSON nested too deeply)"
        ) from None
    except ValueError as e:
        raise UserError(f"{path}: not a datasets save_to_disk file (invalid JSON: {e})") from None


def _saved_names(value: Any, path: Path, field: str, example: str) -> list[str]:
    """A save_to_disk list of names inside the folder (split folders, arrow files):
    a non-empty list of plain names, never a path that leaves the folder."""
    if not isinstance(value, list) or not value:
        got = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise UserError(
            f"{path}: '{field}' must be a non-empty list of names like {example} ({got})"
        )
    for name in value:
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
        ):
            raise UserError(
                f"{path}: '{field}' holds {json.dumps(name)[:40]}, not a name in this folder"
            )
    return value


def _saved_records(folder: Path) -> list[dict]:
    """The rows of a save_to_disk Dataset folder (state.json names its arrow files)."""
    path = folder / "state.json"
    state = _saved_json(path)
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a datasets save_to_disk state (expected an object)")
    files = state.get("_data_files")
    if isinstance(files, list) and all(isinstance(f, dict) for f in files):
        files = [f.get("filename") for f in files]
    names = _saved_names(files, path, "_data_files", '[{"filename": "data-00000-of-00001.arrow"}]')
    records: list[dict] = []
    for name in names:
        records += read_arrow_table(folder / name).to_pylist()
    return records


def saved_dataset_splits(folder: str | Path, split: str | None = None) -> dict:
    """{train, valid, test: raw rows} of a save_to_disk folder (a Dataset is "train")."""
    folder = Path(folder)
    path = folder / "dataset_dict.json"
    if path.is_file():
        dd = _saved_json(path)
        if not isinstance(dd, dict):
            raise UserError(
                f'{path}: not a datasets save_to_disk file (expected {{"splits": [...]}})'
            )
        names = _saved_names(dd.get("splits"), path, "splits", '["train", "test"]')
        for name in names:
            if not (folder / name / "state.json").is_file():
                raise UserError(
                    f"{path}: split {name!r} has no folder {folder / name} with a state.json"
                )
        records = {name: _saved_records(folder / name) for name in names}
    else:
        records = {"train": _saved_records(folder)}
    return dataset_dict_splits(records, str(folder), split)


def source_splits(data: str, split: str | None = None) -> dict | None:
    """{train, valid, test: raw rows} when `data` is a save_to_disk folder or a hub id;
    None for anything else (files and plain folders: mlx_kto.data.rows reads them)."""
    if os.path.isdir(data) and is_saved_dataset(Path(data)):
        return saved_dataset_splits(data, split)
    if looks_like_hub_id(data):
        return hub_dataset_splits(data, split)
    return None


# ---------------------------------------------------------------------------
# Hugging Face hub


def looks_like_hub_id(data: str) -> bool:
    """`owner/name` that is not a local path and has no data-file extension."""
    if data.startswith((".", "/", "~")) or os.path.exists(data):
        return False
    return bool(_HUB_ID.match(data)) and not data.lower().endswith(EXTENSIONS + TABLE_EXTENSIONS)


def _hub_error(data_id: str, e: Exception) -> UserError:
    name = type(e).__name__
    msg = (str(e).strip().splitlines() or [""])[0]
    if "NotFound" in name and "LocalEntry" not in msg:
        return UserError(
            f"data: '{data_id}' is neither a local file or folder nor a dataset on the "
            f"Hugging Face hub ({msg})"
        )
    if isinstance(e, (ConnectionError, TimeoutError)) or "Offline" in msg or "Connect" in name:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        return UserError(
            f"data: the Hugging Face hub is unreachable{offline}, so dataset '{data_id}' "
            "cannot be fetched and it is not in the local datasets cache; no local file or "
            "folder has that name either"
        )
    return UserError(f"data: could not load dataset '{data_id}' from the hub ({name}: {msg})")


def hub_dataset_splits(data_id: str, split: str | None = None) -> dict[str, list[tuple[Any, str]]]:
    """{split: raw rows} of a hub dataset: "train" (or `split`) and, when present,
    "valid" (from valid / validation / val) and "test"."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            f"data: '{data_id}' is not a local file or folder; to load it as a Hugging Face "
            f"dataset id install the datasets library: {HF_HINT}"
        ) from None
    try:
        dd = datasets.load_dataset(data_id)
    except Exception as e:  # network, auth, missing repo: one line
        raise _hub_error(data_id, e) from None
    return dataset_dict_splits(dd, data_id, split)


def dataset_dict_splits(dd, source: str, split: str | None = None) -> dict:
    """{train, valid, test: raw rows} from a `datasets.DatasetDict` (or a mapping of
    split name -> Dataset / list of dicts)."""
    names = list(dd.keys())
    train = split or "train"
    if train not in names:
        raise UserError(
            f"data_split: '{source}' has no split '{train}' (its splits: {', '.join(names)}); "
            "choose one with --data-split"
        )
    chosen = {"train": train}
    for ours, theirs in (("valid", ("valid", "validation", "val")), ("test", ("test",))):
        hit = next((n for n in theirs if n in names and n != train), None)
        if hit:
            chosen[ours] = hit
    return {ours: records_rows(dd[theirs], f"{source}:{theirs}") for ours, theirs in chosen.items()}


def records_rows(records, source: str) -> list[tuple[Any, str]]:
    """Raw rows of a `datasets.Dataset` or a list of dicts (in-memory data), as "source[i]"."""
    if hasattr(records, "to_list"):
        records = records.to_list()
    elif not isinstance(records, list):
        records = list(records)
    return _rows_of(records, source)
