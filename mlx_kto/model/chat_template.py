"""`--chat-template FILE_OR_STRING`: a chat template in place of the tokenizer's.

The value is a file (a Jinja template, or a JSON file with a "chat_template" key such as
a tokenizer_config.json) or the template text itself. It is set on the Hugging Face
tokenizer (inside mlx-lm's TokenizerWrapper), so training, evaluation, generation and
`data check` render messages with it."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.errors import UserError

FLAG_HINT = "pass --chat-template FILE_OR_STRING (or chat_template: in the YAML)"


def read_chat_template(value: str) -> str:
    """The template text of a --chat-template value (see module docstring)."""
    p = Path(value).expanduser()
    looks_inline = "{%" in value or "{{" in value
    if not looks_inline and p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"chat_template: cannot read {p} ({e})") from None
        if p.suffix.lower() == ".json":
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{p}: a .json chat template needs a 'chat_template' key") from None
            if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}]
                named = {t.get("name"): t.get("template") for t in text if isinstance(t, dict)}
                text = named.get("default") or next(iter(named.values()), None)
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{p}: the chat template is empty")
        return text
    if looks_inline:
        return value
    raise UserError(
        f"chat_template: '{value}' is neither a file nor a Jinja template (text with {{% %}} "
        "or {{ }})"
    )


def set_chat_template(tokenizer, value: str):
    """Use the template of `value` for `tokenizer` (a TokenizerWrapper or an HF tokenizer)."""
    text = read_chat_template(value)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.chat_template = text
    if hf is not tokenizer:  # mlx-lm's wrapper: its custom renderer would win, drop it
        tokenizer._chat_template = None
        tokenizer.has_chat_template = True
    _check_renders(tokenizer)
    return tokenizer


def _check_renders(tokenizer) -> None:
    """Fail early, naming the flag, when the template does not render a plain exchange."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # jinja syntax / undefined errors
        msg = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"chat_template: the template does not render a user/assistant exchange "
            f"({type(e).__name__}: {msg})"
        ) from None
