"""Load and validate thumbs-up/down feedback rows into `Example`s.

Accepted row shapes (detected per row; a file may mix shapes but not standard
(string) with conversational (message-list) rows, which tokenize differently):

- unpaired, standard:        {"prompt": str, "completion": str, "label": ...}
- unpaired, conversational:  {"prompt": [msg, ...], "completion": [msg, ...], "label": ...}
- chat log:                  {"messages": [msg, ..., assistant_msg], "label": ...}
- per-message labels:        {"messages": [..., {"role": "assistant", ..., "label": ...}, ...]}
                             (one example per labelled assistant message)
- paired:                    {"prompt": ..., "chosen": ..., "rejected": ...}
- paired, implicit prompt:   {"chosen": ..., "rejected": ...}  (prompt = longest common prefix)

Other field names map through `columns.FieldMap` (--label-field, ...). Lines
`{"retract": id}` (chat undo) remove the row with that "id". Optional columns `tools` (list or JSON string) and `chat_template_kwargs` (dict) go
to `apply_chat_template`. Paired rows become two unpaired rows (chosen: True,
rejected: False), as TRL's `unpair_preference_dataset` does; unlike TRL we then
shuffle the file's rows (seeded) so micro-batches mix labels (kto-spec 2.1, 2.8).
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_kto.data.content_parts import flatten_message
from mlx_kto.data.feedback import drop_retracted
from mlx_kto.data.load import EXTENSIONS, TABLE_EXTENSIONS, read_table_rows, source_splits
from mlx_kto.errors import UserError

DATA_EXTENSIONS = EXTENSIONS + TABLE_EXTENSIONS  # + parquet / arrow (datasets_io)
SPLIT_NAMES = {  # split -> accepted file stems in a data folder
    "train": ("train",),
    "valid": ("valid", "validation", "val"),
    "test": ("test",),
}

_TRUE = {"true", "t", "1", "good", "up", "thumbs_up", "thumbs up", "thumbs-up", "thumbsup"}
_TRUE |= {"👍", "desirable", "yes", "y", "positive", "+1"}
_FALSE = {"false", "f", "0"}
_FALSE |= {"bad", "down", "thumbs_down", "thumbs down", "thumbs-down", "thumbsdown", "👎"}
_FALSE |= {"undesirable", "no", "n", "negative", "-1"}
LABEL_HINT = "use true/false, 1/0, good/bad, up/down, thumbs_up/thumbs_down, desirable/undesirable"


@dataclass
class Example:
    """One unpaired feedback row, validated. `prompt`/`completion` are both strings
    (standard) or both message lists (conversational, chat template applied later)."""

    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool  # True = desirable (thumbs up)
    where: str = ""  # "path:line" (jsonl) or "path[index]" (json), for messages
    tools: list | None = None  # forwarded to apply_chat_template
    chat_template_kwargs: dict | None = None
    paired: bool = False  # one side of a prompt/chosen/rejected row (its partner shares `where`)

    @property
    def conversational(self) -> bool:
        return not isinstance(self.prompt, str)


def parse_label(value: Any, where: str) -> bool:
    """Map a thumbs-up/down value to a bool: bools, 1/0 (and -1 for down), and
    case-insensitive strings such as "true"/"false", "good"/"bad", "up"/"down",
    "thumbs_up"/"thumbs_down", "desirable"/"undesirable", "yes"/"no", 👍/👎."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        if value == 1:
            return True
        if value in (0, -1):
            return False
    elif isinstance(value, str):
        key = value.strip().lower()
        if key in _TRUE:
            return True
        if key in _FALSE:
            return False
    if value is None:
        raise UserError(f"{where}: label is null; every row needs a thumbs-up/down label")
    hint = ""
    if isinstance(value, (int, float)):  # a rating scale: say how to map it
        hint = "; for numeric ratings set --label-threshold (e.g. 4 for 1-5 stars)"
    raise UserError(f"{where}: label {value!r} is not a thumbs-up/down value ({LABEL_HINT}){hint}")


# ---------------------------------------------------------------------------
# Field validation


def _check_messages(value: Any, field: str, where: str) -> list[dict]:
    """A non-empty list of {"role": str, "content": str | list | None(tool calls)}."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: '{field}' must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(
                f"{where}: '{field}'[{i}] must be a message object with 'role' and 'content', "
                f"got {type(m).__name__}"
            )
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise UserError(f"{where}: '{field}'[{i}] has no 'role'")
        content = m.get("content")
        # Assistant tool calls may carry no text content.
        if content is None and not m.get("tool_calls"):
            raise UserError(f"{where}: '{field}'[{i}] (role {m['role']!r}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise UserError(
                f"{where}: '{field}'[{i}] 'content' must be a string, got {type(content).__name__}"
            )
    return [flatten_message(m, f"{where}: '{field}'[{i}]") for i, m in enumerate(value)]


def _check_text_or_messages(value: Any, field: str, where: str) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, field, where)
    if value is None:
        raise UserError(f"{where}: '{field}' is null")
    raise UserError(
        f"{where}: '{field}' must be a string or a list of messages, got {type(value).__name__}"
    )


def _is_empty(value: str | list[dict]) -> bool:
    """An empty or whitespace-only string, or messages with neither text nor tool calls
    (a blank reply teaches nothing but where the EOS goes)."""
    if isinstance(value, str):
        return not value.strip()
    return all(_blank(m.get("content")) and not m.get("tool_calls") for m in value)


def _blank(content: Any) -> bool:
    return content in (None, []) or (isinstance(content, str) and not content.strip())


def _check_completion(value: Any, field: str, where: str) -> str | list[dict]:
    value = _check_text_or_messages(value, field, where)
    if _is_empty(value):
        raise UserError(f"{where}: '{field}' is empty or only whitespace")
    return value


def _same_kind(prompt: Any, completion: Any, field: str, where: str) -> None:
    if isinstance(prompt, str) != isinstance(completion, str):
        kinds = {True: "a string", False: "a message list"}
        raise UserError(
            f"{where}: 'prompt' is {kinds[isinstance(prompt, str)]} but '{field}' is "
            f"{kinds[isinstance(completion, str)]}; use strings for both or message lists for both"
        )


def _tools(row: dict, where: str) -> list | None:
    tools = row.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: 'tools' is a string but not valid JSON ({e.msg})") from None
    if not isinstance(tools, list):
        raise UserError(
            f"{where}: 'tools' must be a list of tool schemas, got {type(tools).__name__}"
        )
    return tools


def _template_kwargs(row: dict, where: str) -> dict | None:
    kw = row.get("chat_template_kwargs")
    if kw is None:
        return None
    if isinstance(kw, str):
        try:
            kw = json.loads(kw)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{where}: 'chat_template_kwargs' is not valid JSON ({e.msg})"
            ) from None
    if not isinstance(kw, dict):
        raise UserError(
            f"{where}: 'chat_template_kwargs' must be an object, got {type(kw).__name__}"
        )
    return kw


def _common_prefix(chosen: str | list, rejected: str | list) -> int:
    """Length of the shared prompt of an implicit-prompt pair (TRL `extract_prompt`):
    whole messages for lists; for strings the common characters, with a trailing
    space handed back to the completions ("The sky is| blue" / "The sky is| green")."""
    n = min(len(chosen), len(rejected))
    k = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < k < n and chosen[k - 1] == " ":
        k -= 1
    return k


# ---------------------------------------------------------------------------
# Row parsing


def parse_row(row: Any, where: str) -> tuple[list[Example], bool]:
    """Validate one raw row -> (unpaired examples, was_paired)."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: each row must be a JSON object, got {type(row).__name__}")
    tools, kwargs = _tools(row, where), _template_kwargs(row, where)

    def ex(prompt, completion, label):
        return Example(prompt, completion, label, where, tools, kwargs)

    if "chosen" in row or "rejected" in row:
        for field in ("chosen", "rejected"):
            if field not in row:
                raise UserError(f"{where}: paired row has no '{field}'")
        for field in ("completion", "messages", "label"):
            if field in row:
                raise UserError(
                    f"{where}: row mixes paired ('chosen'/'rejected') and unpaired ('{field}') fields"
                )
        chosen = _check_text_or_messages(row["chosen"], "chosen", where)
        rejected = _check_text_or_messages(row["rejected"], "rejected", where)
        _same_kind(chosen, rejected, "rejected", where)
        if "prompt" in row:
            prompt = _check_text_or_messages(row["prompt"], "prompt", where)
            _same_kind(prompt, chosen, "chosen", where)
            if isinstance(prompt, list) and not prompt:
                raise UserError(f"{where}: 'prompt' is an empty message list")
        else:
            k = _common_prefix(chosen, rejected)
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
            if isinstance(prompt, list) and not prompt:
                raise UserError(
                    f"{where}: 'chosen' and 'rejected' share no leading messages, so there is "
                    "no prompt; add a 'prompt' field"
                )
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if _is_empty(value):
                why = "" if "prompt" in row else " after removing the prompt it shares"
                raise UserError(f"{where}: '{field}' is empty{why}")
        pair = [ex(prompt, chosen, True), ex(prompt, rejected, False)]
        for e in pair:
            e.paired = True  # DPO finds the two sides again by `where` (pairs.find_pairs)
        return pair, True

    if "messages" in row:
        for field in ("prompt", "completion"):
            if field in row:
                raise UserError(f"{where}: row has both 'messages' and '{field}'; use one format")
        messages = _check_messages(row["messages"], "messages", where)
        if any("label" in m for m in messages):
            if "label" in row:
                raise UserError(
                    f"{where}: row has a top-level 'label' and labels on messages; use one"
                )
            return _per_message_examples(messages, where, ex), False
        if "label" not in row:
            raise UserError(f"{where}: row has no 'label'")
        label = parse_label(row["label"], where)
        last = messages[-1]
        if last["role"] != "assistant":
            raise UserError(
                f"{where}: the last message of 'messages' must be the assistant's reply "
                f"(the rated completion), got role {last['role']!r}"
            )
        if len(messages) < 2:
            raise UserError(f"{where}: 'messages' has no prompt before the assistant's reply")
        if _is_empty([last]):
            raise UserError(f"{where}: the assistant's reply in 'messages' is empty")
        return [ex(messages[:-1], [last], label)], False

    for field in ("prompt", "completion", "label"):
        if field not in row:
            found = ", ".join(repr(k) for k in row) or "none"
            raise UserError(
                f"{where}: row has no '{field}' (fields found: {found}); expected "
                "prompt/completion/label, messages/label, or prompt/chosen/rejected"
            )
    prompt = _check_text_or_messages(row["prompt"], "prompt", where)
    completion = _check_completion(row["completion"], "completion", where)
    _same_kind(prompt, completion, "completion", where)
    if isinstance(prompt, list) and not prompt:
        raise UserError(f"{where}: 'prompt' is an empty message list")
    return [ex(prompt, completion, parse_label(row["label"], where))], False


def _per_message_examples(messages: list[dict], where: str, ex) -> list[Example]:
    """A chat with a `label` on one or more assistant messages: one example per
    labelled message, its prompt the conversation before it (labels stripped)."""
    plain = [{k: v for k, v in m.items() if k != "label"} for m in messages]
    out = []
    for i, m in enumerate(messages):
        if "label" not in m:
            continue
        at = f"{where}: 'messages'[{i}]"
        if m["role"] != "assistant":
            raise UserError(f"{at}: a label is on a {m['role']!r} message; rate assistant replies")
        if i == 0:
            raise UserError(f"{at}: the labelled reply has no prompt before it")
        if _is_empty([plain[i]]):
            raise UserError(f"{at}: the labelled reply is empty")
        out.append(ex(plain[:i], [plain[i]], parse_label(m["label"], at)))
    return out


def _read_rows(path: Path) -> list[tuple[Any, str]]:
    """Raw rows of a .jsonl/.json file with their "path:line" / "path[i]" locations."""
    ext = path.suffix.lower()
    if ext in TABLE_EXTENSIONS:
        return read_table_rows(path)
    if ext not in EXTENSIONS:
        raise UserError(
            f"{path}: unsupported file type '{path.suffix}' (use .jsonl, .json, .parquet or .arrow)"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    if ext == ".json":
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise UserError(f'{path}: expected a list of rows (or {{"data": [...]}})')
        return [(row, f"{path}[{i}]") for i, row in enumerate(data)]
    rows = []
    lines = text.splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not text.endswith("\n"):
                # A writer killed mid-append (never acknowledged): skip, don't fail.
                logging.getLogger("mlx_kto").warning(
                    "warning: %s:%d: skipped a torn last line (%s)", path, lineno, e.msg
                )
                continue
            raise UserError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
    return rows


def load_examples(path: str | Path, seed: int = 0, fields=None) -> list[Example]:
    """Read one .jsonl or .json file of feedback rows into validated `Example`s.

    Paired rows are unpaired (chosen -> True, rejected -> False); if the file had any,
    all its rows are shuffled with `random.Random(seed)` so micro-batches mix labels."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a .jsonl/.json file (or use load_splits)")
    return examples_from_rows(_read_rows(path), str(path), seed, fields)


def examples_from_rows(
    rows: list[tuple[Any, str]], source: str, seed: int = 0, fields=None
) -> list[Example]:
    """Validated `Example`s of raw (row, "where") pairs read from `source` (see load_examples).
    Retracted ratings (`{"retract": id}` lines of `mlx-kto chat`) are dropped; `fields` (a
    columns.FieldMap: --label-field, ...) maps other column names first."""
    path = source
    examples: list[Example] = []
    any_paired = False
    first_kind: tuple[bool, str] | None = None  # (conversational, where) of the first row
    for row, where in drop_retracted(rows):
        if fields is not None:  # a columns.FieldMap (--label-field, ...)
            row = fields.apply(row, where)
        exs, paired = parse_row(row, where)
        any_paired |= paired
        kind = exs[0].conversational
        if first_kind is None:
            first_kind = (kind, where)
        elif kind != first_kind[0]:
            names = {True: "conversational (message lists)", False: "standard (strings)"}
            first = first_kind[1][len(str(path)) :].lstrip(":")  # "3" or "[0]"
            first = f"line {first}" if first.isdigit() else first
            raise UserError(
                f"{where}: row is {names[kind]} but the first row ({first}) is "
                f"{names[first_kind[0]]}; a file must use one of the two"
            )
        examples.extend(exs)
    if not examples:
        raise UserError(f"{path}: no rows (empty file)")
    if any_paired:
        random.Random(seed).shuffle(examples)
    return examples


def find_split_files(folder: str | Path) -> dict[str, Path]:
    """{split: file} for train/valid/test files in a data folder (train.jsonl, ...)."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        hits = [
            folder / f"{stem}{ext}"
            for stem in stems
            for ext in DATA_EXTENSIONS
            if (folder / f"{stem}{ext}").is_file()
        ]
        if len(hits) > 1:
            names = ", ".join(p.name for p in hits)
            raise UserError(f"{folder}: several {split} files ({names}); keep one")
        if hits:
            found[split] = hits[0]
    return found


def load_splits(
    path: str | Path, seed: int = 0, fields=None, split: str | None = None
) -> dict[str, list[Example]]:
    """A file -> {"train": rows}; a folder -> {"train", "valid", "test"} (those present),
    read from train.jsonl / valid.jsonl (or validation/val) / test.jsonl (or .json, .parquet,
    .arrow); a `save_to_disk` folder or a Hugging Face dataset id -> its splits, `split`
    naming the training one (datasets_io)."""
    raw = source_splits(str(path), split)
    if raw is not None:
        return {
            name: examples_from_rows(rows, str(path), seed, fields) for name, rows in raw.items()
        }
    if split not in (None, "train"):
        raise UserError(
            f"data_split: '{split}' applies to a Hugging Face dataset id or a save_to_disk "
            f"folder; {path} is neither (its splits are train/valid/test files)"
        )
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_file():
        return {"train": load_examples(path, seed, fields)}
    files = find_split_files(path)
    if "train" not in files:
        raise UserError(f"{path}: no train.jsonl (or train.json) in this folder")
    return {split: load_examples(file, seed, fields) for split, file in files.items()}
