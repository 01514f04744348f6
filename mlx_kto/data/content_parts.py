"""OpenAI-style content-part lists in messages -> plain text.

`{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}`
becomes `{"role": "user", "content": "Hi!"}` (parts concatenated, as OpenAI's API reads them),
so a text chat template renders the words, not a Python repr of the list. Non-text parts
(images, audio, files) cannot be trained on by a text model: an error names the row."""

from __future__ import annotations

from typing import Any

from mlx_kto.errors import UserError


def flatten_content(content: list, where: str) -> str:
    """The text of a content-part list; `where` ("file:3: 'messages'[1]") names it in errors."""
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):  # a bare string part
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        raise UserError(
            f"{where} content part [{j}] is of type {kind!r}; only text parts "
            '({"type": "text", "text": ...}) can be trained on by a text model'
        )
    return "".join(texts)


def flatten_message(message: dict, where: str) -> dict[str, Any]:
    """`message` with a list `content` replaced by its text (other messages unchanged)."""
    if isinstance(message.get("content"), list):
        return {**message, "content": flatten_content(message["content"], where)}
    return message
