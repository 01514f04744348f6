"""Everything the web chat reads from a request or shows from the feedback file, checked
in one place, so that no body (and no line of the file) can reach the handlers in a
shape they do not expect: every bad request is a 4xx with a JSON `{"error": ...}`.

- the body: `application/json`, at most MAX_BODY bytes (a larger Content-Length is
  refused before reading; a body without one is read only up to the limit), valid
  UTF-8 JSON, nesting within Python's parser limits;
- the fields: `FIELDS[endpoint]` names each field's type (a list or object where a
  string id belongs is refused, not looked up);
- the conversation: user/assistant turns of text ending with the user's;
- the ratings view: each row reduced to strings, whatever the file holds.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

MAX_BODY = 1 << 20  # 1 MB of JSON is far more than a chat turn


class BadRequest(Exception):
    """A request the server refuses: `status` (4xx) and a one-line reason."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# endpoint -> {field: (check, what the field must be)}; all fields are required.
FIELDS: dict[str, dict[str, tuple[type, str]]] = {
    "reply": {"messages": (list, "the conversation: a non-empty list of messages")},
    "rate": {
        "reply_id": (str, "the id (a string) of a reply from this server"),
        "label": (bool, "true (thumbs up) or false (thumbs down)"),
    },
    "undo": {"rating_id": (str, "the id (a string) of a rating in the feedback file")},
}


async def read_json(request: Request) -> Any:
    """The request's JSON body, read at most MAX_BODY bytes far."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest("send application/json", 415)
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(declared) > MAX_BODY:
            raise BadRequest(f"request too large (over {MAX_BODY} bytes)", 413)
    chunks, size = [], 0
    async for chunk in request.stream():  # stop at the limit, whatever the client sends
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(f"request too large (over {MAX_BODY} bytes)", 413)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        return json.loads(raw)
    except RecursionError:
        raise BadRequest("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text") from None
    except ValueError as e:  # JSONDecodeError, or an integer longer than Python converts
        raise BadRequest(f"invalid JSON ({str(e).splitlines()[0][:120]})") from None


def fields(data: Any, endpoint: str) -> dict:
    """The endpoint's fields of a JSON body, each of the type FIELDS names."""
    if not isinstance(data, dict):
        raise BadRequest("expected a JSON object")
    out = {}
    for name, (kind, what) in FIELDS[endpoint].items():
        value = data.get(name)
        # bool is a subclass of int: only `bool` fields take true/false
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise BadRequest(f"'{name}' must be {what}")
        out[name] = value
    return out


def conversation(value: list) -> list[dict]:
    """The page's conversation: user/assistant turns of text, ending with the user's."""
    if not value:
        raise BadRequest("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise BadRequest(f"messages[{i}]: role must be 'user' or 'assistant'")
        if not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}]: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user" or not out[-1]["content"].strip():
        raise BadRequest("the last message must be the user's (non-empty)")
    return out


def _text(value: Any) -> str | None:
    """A message's content as display text (content parts joined; anything else as JSON)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(p["text"] for p in value if isinstance(p.get("text"), str))
    return json.dumps(value, ensure_ascii=False)


def _content(value: Any, role: str | None) -> str | None:
    """The last `role` message's text of a conversational value (or the value itself)."""
    if not isinstance(value, list):
        return _text(value)
    for m in reversed(value):
        if isinstance(m, dict) and (role is None or m.get("role") == role):
            return _text(m.get("content"))
    return None


def display_rating(row: dict) -> dict:
    """One live rating for the ratings view: strings (or null) only, whatever the row holds."""
    meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
    rid, label, time = row.get("id"), row.get("label"), meta.get("time")
    reply = meta.get("reply")
    return {
        "id": rid if isinstance(rid, str) else None,
        "label": label if isinstance(label, bool) else None,
        "prompt": _content(row.get("prompt"), "user"),
        "completion": _content(row.get("completion"), None),
        "time": time if isinstance(time, str) else None,
        "reply_id": reply if isinstance(reply, str) else None,
        "undoable": isinstance(rid, str),
    }
