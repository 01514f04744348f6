"""Import ratings made in other tools into our feedback format.

Open WebUI (both exports are JSON lists; a single object is accepted too):

- feedback export (Admin > Evaluations > Export; `/api/v1/evaluations/feedbacks/all/export`):
  records `{"id", "type": "rating", "data": {"rating": 1 | -1, "reason", "comment", ...},
  "meta": {"message_id", "message_index", "chat_id", ...}, "snapshot": {"chat": <chat>}}`,
  where `<chat>` is the chat record `{"id", "title", "chat": {"history": {"messages":
  {id: msg}, "currentId"}, "messages": [...], "params": {"system"?}}}` (older exports put
  the inner chat object there directly). The rated message is found by `meta.message_id`
  in the message tree (its branch, walking `parentId` to the root); without it,
  `meta.message_index` (the rated message's 1-based position in `chat.messages`).
- chat export (Settings > Chats > Export): chat records whose assistant messages carry
  `annotation: {"rating": 1 | -1, ...}`; every rated message on any branch is one row.

Each rated assistant message becomes one conversational row `{"id", "prompt": [the
conversation before it], "completion": [the reply], "label", "meta": {...}}`, which
`mlx-kto train` reads as is. Unrated messages (no rating, or null) are skipped and
counted; any other rating value, a missing message or a malformed record is an error
naming the file, the record and the field: every field read is type-checked where it
is read (`_get`), e.g. ids are strings and `history.messages` is an object {id: message}
(or a list of messages that each carry their `id`).

The same rated message twice (one row id: the feedback record's id, or chat id +
message id in a chat export), e.g. an export concatenated with a later one: the later
record wins, as a later rating replaces an earlier one in Open WebUI, and the import
says how many it replaced and how many of those changed the rating.

The output is written whole or not at all (temp file + rename) in the format its name
says: `.jsonl` / `.ndjson` one row per line, `.json` a JSON list; other names, and
folders, are refused before anything is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlx_kto.data.feedback import describe_value
from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_with, write_errors

ROLES = ("system", "user", "assistant")
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}
_WHAT = {str: "a string", dict: "an object", list: "a list", int: "an integer"}


def _get(obj: dict, key: str, kind: type, where: str, field: str) -> Any:
    """obj[key] when it is a `kind` (None when missing or null); anything else is an
    error naming the field and what it holds."""
    value = obj.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    raise UserError(f"{where}: {field} must be {_WHAT[kind]}, not {describe_value(value)}")


def _rating(value: Any, where: str, field: str) -> bool | None:
    """1 -> True, -1 -> False, None -> unrated; anything else is an error."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in ("1", "-1", "+1"):
        value = int(value)
    if not isinstance(value, bool) and isinstance(value, (int, float)) and value in (1, -1):
        return value == 1
    raise UserError(f"{where}: {field} is {value!r}; expected 1 (thumbs up) or -1 (thumbs down)")


def _inner_chat(record: Any, where: str, field: str) -> dict:
    """The chat object holding `history` / `messages` (a chat record wraps it in `chat`)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: {field} must be an object, not {describe_value(record)}")
    inner = record.get("chat")
    chat = inner if isinstance(inner, dict) else record
    if chat.get("history") is None and chat.get("messages") is None:
        raise UserError(f"{where}: {field} has no 'history' or 'messages' (not an Open WebUI chat)")
    _get(chat, "history", dict, where, f"{field}.history")
    _get(chat, "messages", list, where, f"{field}.messages")
    return chat


def _clean(msg: Any, where: str) -> dict:
    if not isinstance(msg, dict):
        raise UserError(f"{where}: a message is not an object")
    role, content = msg.get("role"), msg.get("content")
    if role not in ROLES:
        raise UserError(f"{where}: message {msg.get('id', '?')!r} has role {role!r}")
    if not isinstance(content, str):
        raise UserError(f"{where}: message {msg.get('id', '?')!r} has no text 'content'")
    return {"role": role, "content": content}


def _tree(chat: dict, where: str) -> dict[str, dict]:
    """history.messages as {id: message}; every message an object (ids are strings)."""
    h = chat.get("history") or {}
    msgs = h.get("messages")
    if msgs is None:
        return {}
    if isinstance(msgs, list):  # some exports list the tree's messages: each needs its id
        tree = {}
        for i, m in enumerate(msgs):
            at = f"history.messages[{i}]"
            if not isinstance(m, dict):
                raise UserError(f"{where}: {at} must be a message object, not {describe_value(m)}")
            mid = _get(m, "id", str, where, f"{at}.id")
            if not mid:
                raise UserError(
                    f"{where}: {at} has no 'id' (a list of messages must name each one; "
                    "Open WebUI writes history.messages as an object {id: message})"
                )
            tree[mid] = m
        return tree
    if not isinstance(msgs, dict):
        raise UserError(
            f"{where}: history.messages must be an object {{id: message}}, not {describe_value(msgs)}"
        )
    for mid, m in msgs.items():
        if not isinstance(m, dict):
            raise UserError(f"{where}: history.messages[{mid!r}] must be a message object")
    return msgs


def _branch(tree: dict[str, dict], msg_id: str, where: str) -> list[dict]:
    """Messages from the root to `msg_id` (inclusive), following parentId."""
    path, seen, cur = [], set(), msg_id
    while cur is not None:
        if cur in seen:
            raise UserError(f"{where}: message tree has a parentId cycle at {cur!r}")
        seen.add(cur)
        m = tree.get(cur)
        if m is None:
            raise UserError(f"{where}: message {cur!r} (a parentId) is not in history.messages")
        path.append(m)
        cur = _get(m, "parentId", str, where, f"message {cur!r} parentId")
    return path[::-1]


def _system(chat: dict, where: str) -> list[dict]:
    params = _get(chat, "params", dict, where, "chat params") or {}
    system = _get(params, "system", str, where, "params.system")
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _row(chat: dict, branch: list[dict], label: bool, where: str, meta: dict) -> dict:
    msgs = [_clean(m, where) for m in branch]
    reply = msgs[-1]
    if reply["role"] != "assistant":
        raise UserError(f"{where}: the rated message is a {reply['role']!r} message, not a reply")
    if not reply["content"].strip():
        raise UserError(f"{where}: the rated reply is empty")
    prompt = msgs[:-1]
    if not any(m["role"] == "system" for m in prompt):  # the chat's system prompt, if set
        prompt = _system(chat, where) + prompt
    if not any(m["role"] == "user" for m in prompt):
        raise UserError(f"{where}: the rated reply has no user message before it")
    rated = branch[-1]
    meta = {
        "source": "open-webui",
        "model": rated.get("model"),
        "message_id": _get(rated, "id", str, where, "the rated message's id"),
        "time": rated.get("timestamp"),
        **{k: v for k, v in meta.items() if v not in (None, "", [])},
    }
    rid = meta.get("feedback_id") or f"open-webui:{meta.get('chat_id')}:{rated.get('id')}"
    return {"id": str(rid), "prompt": prompt, "completion": [reply], "label": label, "meta": meta}


def _record_id(obj: dict, where: str, field: str) -> str | None:
    """An id Open WebUI writes as a string (a number is taken as its digits)."""
    value = obj.get(field.rpartition(".")[2])
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _get(obj, field.rpartition(".")[2], str, where, field)


def _from_feedback(rec: dict, where: str) -> dict | None:
    data = rec.get("data")
    if not isinstance(data, dict):
        raise UserError(f"{where}: 'data' must be an object holding 'rating'")
    label = _rating(data.get("rating"), where, "data.rating")
    if label is None:
        return None
    meta = _get(rec, "meta", dict, where, "meta") or {}
    snap = rec.get("snapshot")
    if not isinstance(snap, dict) or "chat" not in snap:
        raise UserError(f"{where}: 'snapshot.chat' is missing (export with the chat snapshot)")
    chat = _inner_chat(snap["chat"], where, "snapshot.chat")
    tree = _tree(chat, where)
    mid = _get(meta, "message_id", str, where, "meta.message_id")
    idx = _get(meta, "message_index", int, where, "meta.message_index")
    if mid and mid in tree:
        branch = _branch(tree, mid, where)
    else:
        flat = chat.get("messages") or []
        by_id = [
            i for i, m in enumerate(flat) if isinstance(m, dict) and mid and m.get("id") == mid
        ]
        if by_id:
            branch = flat[: by_id[0] + 1]
        elif idx is not None and 1 <= idx <= len(flat):
            branch = flat[:idx]  # message_index counts the messages up to the rated one
        else:
            raise UserError(
                f"{where}: meta.message_id {mid!r} is not in the snapshot and meta.message_index "
                f"{idx!r} is not a position in snapshot.chat messages"
            )
    extra = {
        "feedback_id": _record_id(rec, where, "id"),
        "chat_id": _record_id(meta, where, "meta.chat_id"),
        "reason": data.get("reason"),
        "comment": data.get("comment"),
        "tags": data.get("tags"),
    }
    return _row(chat, branch, label, where, extra)


def _from_chat(rec: dict, where: str) -> tuple[list[dict], int]:
    chat = _inner_chat(rec, where, "chat")
    owner = rec if isinstance(rec.get("chat"), dict) else chat
    chat_id = _record_id(owner, where, "id")
    rows, skipped = [], 0
    tree = _tree(chat, where)
    if tree:
        candidates = list(tree.items())
    else:
        flat = chat.get("messages") or []
        candidates = [(i, m) for i, m in enumerate(flat) if isinstance(m, dict)]
    for key, m in candidates:
        if m.get("role") != "assistant":
            continue
        at = f"{where} message {m.get('id', key)!r}"
        ann = _get(m, "annotation", dict, at, "annotation") or {}
        rating = ann.get("rating")
        label = _rating(rating, at, "annotation.rating")
        if label is None:
            skipped += 1
            continue
        branch = _branch(tree, key, at) if tree else chat["messages"][: key + 1]
        extra = {"chat_id": chat_id, "reason": ann.get("reason"), "comment": ann.get("comment")}
        rows.append(_row(chat, branch, label, at, extra))
    return rows, skipped


def read_open_webui(path: str | Path) -> tuple[list[dict], int]:
    """(rows, number of unrated messages/records skipped) from either export shape."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give the export's .json file")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be an Open WebUI export") from None
    except ValueError as e:  # e.g. an integer longer than Python converts
        raise UserError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    records = [data] if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON list of Open WebUI records")
    rows, skipped = [], 0
    for i, rec in enumerate(records):
        where = f"{path}[{i}]"
        if not isinstance(rec, dict):
            raise UserError(f"{where}: record is not an object")
        if "snapshot" in rec or "data" in rec:  # feedback export
            row = _from_feedback(rec, where)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
        elif "chat" in rec or "history" in rec or "messages" in rec:  # chat export
            got, n = _from_chat(rec, where)
            rows.extend(got)
            skipped += n
        else:
            found = ", ".join(map(repr, rec)) or "none"
            raise UserError(
                f"{where}: neither a feedback record (data/meta/snapshot) nor a chat "
                f"(chat/history); fields found: {found}"
            )
    return rows, skipped


def check_output(path: str | Path) -> str:
    """The format an output name asks for ("jsonl" or "json"); folders and other
    names are refused (before any input is read; the CLI then runs check_out_file)."""
    path = Path(path)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if path.is_dir():
        raise UserError(f"output: {path} is a folder; give a file name ending in .jsonl")
    if fmt is None:
        raise UserError(
            f"output: {path} should end in .jsonl (one row per line) or .json (a JSON list), "
            "the formats `mlx-kto train --data` reads"
        )
    return fmt


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """All rows, in the format the name says, written whole or not at all."""
    path = Path(path)
    fmt = check_output(path)
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    text = "\n".join(lines) + "\n" if fmt == "jsonl" else "[\n" + ",\n".join(lines) + "\n]\n"
    with write_errors(path):  # disk full, read-only: one line naming the file
        atomic_write_with(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def latest_per_id(rows: list[dict]) -> tuple[list[dict], int, int]:
    """One row per id, the later record winning (in its place in the list); returns
    (rows, records replaced, of which changed the label)."""
    last = {row["id"]: i for i, row in enumerate(rows)}
    replaced = changed = 0
    for i, row in enumerate(rows):
        if last[row["id"]] != i:
            replaced += 1
            changed += row["label"] != rows[last[row["id"]]]["label"]
    return [row for i, row in enumerate(rows) if last[row["id"]] == i], replaced, changed


def import_open_webui(export: str | Path, output: str | Path) -> tuple[int, dict]:
    """Convert an Open WebUI export into a feedback file; returns (rows, counts)."""
    check_output(output)
    rows, skipped = read_open_webui(export)
    if not rows:
        raise UserError(f"{export}: no rated messages found (skipped {skipped} unrated)")
    rows, replaced, changed = latest_per_id(rows)
    write_rows(output, rows)
    up = sum(r["label"] for r in rows)
    counts = {"up": up, "down": len(rows) - up, "skipped": skipped}
    return len(rows), {**counts, "replaced": replaced, "changed": changed}
