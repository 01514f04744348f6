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
naming the file, the record and the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

ROLES = ("system", "user", "assistant")


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
        raise UserError(f"{where}: {field} must be an object")
    inner = record.get("chat")
    chat = inner if isinstance(inner, dict) else record
    if not isinstance(chat.get("history"), dict) and not isinstance(chat.get("messages"), list):
        raise UserError(f"{where}: {field} has no 'history' or 'messages' (not an Open WebUI chat)")
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


def _tree(chat: dict) -> dict[str, dict]:
    h = chat.get("history")
    msgs = h.get("messages") if isinstance(h, dict) else None
    if isinstance(msgs, list):  # some exports list the tree's messages
        msgs = {m.get("id"): m for m in msgs if isinstance(m, dict)}
    return msgs if isinstance(msgs, dict) else {}


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
        cur = m.get("parentId")
    return path[::-1]


def _system(chat: dict) -> list[dict]:
    system = (
        (chat.get("params") or {}).get("system") if isinstance(chat.get("params"), dict) else None
    )
    return (
        [{"role": "system", "content": system}]
        if isinstance(system, str) and system.strip()
        else []
    )


def _row(chat: dict, branch: list[dict], label: bool, where: str, meta: dict) -> dict:
    msgs = [_clean(m, where) for m in branch]
    reply = msgs[-1]
    if reply["role"] != "assistant":
        raise UserError(f"{where}: the rated message is a {reply['role']!r} message, not a reply")
    if not reply["content"].strip():
        raise UserError(f"{where}: the rated reply is empty")
    prompt = msgs[:-1]
    if not any(m["role"] == "system" for m in prompt):  # the chat's system prompt, if set
        prompt = _system(chat) + prompt
    if not any(m["role"] == "user" for m in prompt):
        raise UserError(f"{where}: the rated reply has no user message before it")
    rated = branch[-1]
    meta = {
        "source": "open-webui",
        "model": rated.get("model"),
        "message_id": rated.get("id"),
        "time": rated.get("timestamp"),
        **{k: v for k, v in meta.items() if v not in (None, "", [])},
    }
    rid = meta.get("feedback_id") or f"open-webui:{meta.get('chat_id')}:{rated.get('id')}"
    return {"id": rid, "prompt": prompt, "completion": [reply], "label": label, "meta": meta}


def _from_feedback(rec: dict, where: str) -> dict | None:
    data, meta = rec.get("data"), rec.get("meta")
    if not isinstance(data, dict):
        raise UserError(f"{where}: 'data' must be an object holding 'rating'")
    label = _rating(data.get("rating"), where, "data.rating")
    if label is None:
        return None
    meta = meta if isinstance(meta, dict) else {}
    snap = rec.get("snapshot")
    if not isinstance(snap, dict) or "chat" not in snap:
        raise UserError(f"{where}: 'snapshot.chat' is missing (export with the chat snapshot)")
    chat = _inner_chat(snap["chat"], where, "snapshot.chat")
    tree, mid = _tree(chat), meta.get("message_id")
    if mid and mid in tree:
        branch = _branch(tree, mid, where)
    else:
        flat = chat.get("messages") if isinstance(chat.get("messages"), list) else []
        idx = meta.get("message_index")
        by_id = [
            i for i, m in enumerate(flat) if isinstance(m, dict) and mid and m.get("id") == mid
        ]
        if by_id:
            branch = flat[: by_id[0] + 1]
        elif isinstance(idx, int) and not isinstance(idx, bool) and 1 <= idx <= len(flat):
            branch = flat[:idx]  # message_index counts the messages up to the rated one
        else:
            raise UserError(
                f"{where}: meta.message_id {mid!r} is not in the snapshot and meta.message_index "
                f"{idx!r} is not a position in snapshot.chat messages"
            )
    extra = {
        "feedback_id": rec.get("id"),
        "chat_id": meta.get("chat_id"),
        "reason": data.get("reason"),
        "comment": data.get("comment"),
        "tags": data.get("tags"),
    }
    return _row(chat, branch, label, where, extra)


def _from_chat(rec: dict, where: str) -> tuple[list[dict], int]:
    chat = _inner_chat(rec, where, "chat")
    chat_id = rec.get("id") if isinstance(rec.get("chat"), dict) else chat.get("id")
    rows, skipped = [], 0
    tree = _tree(chat)
    if tree:
        candidates = [(mid, m) for mid, m in tree.items() if isinstance(m, dict)]
    else:
        flat = chat.get("messages") or []
        candidates = [(i, m) for i, m in enumerate(flat) if isinstance(m, dict)]
    for key, m in candidates:
        if m.get("role") != "assistant":
            continue
        ann = m.get("annotation")
        rating = ann.get("rating") if isinstance(ann, dict) else None
        at = f"{where} message {m.get('id', key)!r}"
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
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
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


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write all rows to a temp file beside `path`, fsync, rename: all or nothing."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def import_open_webui(export: str | Path, output: str | Path) -> tuple[int, dict]:
    """Convert an Open WebUI export into a feedback file; returns (rows, counts)."""
    rows, skipped = read_open_webui(export)
    if not rows:
        raise UserError(f"{export}: no rated messages found (skipped {skipped} unrated)")
    write_jsonl_atomic(Path(output), rows)
    up = sum(r["label"] for r in rows)
    return len(rows), {"up": up, "down": len(rows) - up, "skipped": skipped}
