"""Column mapping for feedback logs whose fields have other names.

`--label-field rating --prompt-field question --completion-field answer` (or
`--messages-field conversation`; each also a YAML key) read those fields as
`label` / `prompt` / `completion` / `messages`. A name may be a dotted path into
nested objects (`feedback.score`). `--label-threshold T` maps numeric ratings:
value >= T is desirable, value < T undesirable (e.g. 4 for 1-5 stars, 0.5 for
scores in [0, 1]); without it only 1 / 0 / -1 count as numbers. Anything else that
is neither a number nor a known thumbs-up/down word stays an error, as does a row
that has both the mapped field and the standard one (which of them is meant?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mlx_kto.errors import UserError

CANONICAL = ("label", "prompt", "completion", "messages")
CONFIG_FIELDS = tuple(f"{name}_field" for name in CANONICAL) + ("label_threshold",)


@dataclass(frozen=True)
class FieldMap:
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    label_threshold: float | None = None

    @classmethod
    def from_config(cls, cfg) -> FieldMap | None:
        """The mapping set on a KTOConfig (None when nothing is mapped)."""
        fm = cls(
            **{name: getattr(cfg, f"{name}_field", None) for name in CANONICAL},
            label_threshold=getattr(cfg, "label_threshold", None),
        )
        return None if fm == cls() else fm

    def apply(self, row: Any, where: str) -> Any:
        """A copy of `row` with mapped fields renamed to the standard names and a
        numeric label thresholded; raises UserError naming the row and the flag."""
        if not isinstance(row, dict):
            return row
        out = dict(row)
        for name in CANONICAL:
            source = getattr(self, name)
            if not source or source == name:
                continue
            flag = f"--{name}-field"
            found, value = _lookup(row, source)
            if not found:
                if name == "label" and _relabel_messages(out, source):
                    continue  # per-message labels under the mapped name
                raise UserError(f"{where}: row has no '{source}' (given as {flag})")
            if name in row:
                raise UserError(
                    f"{where}: row has both '{source}' ({flag}) and '{name}'; "
                    f"it is ambiguous which is meant (rename or drop one)"
                )
            if "." not in source:
                out.pop(source, None)
            out[name] = value
        if self.label_threshold is not None:
            t = self.label_threshold
            if "label" in out:
                out["label"] = threshold_label(out["label"], t, where)
            if isinstance(out.get("messages"), list):  # per-message labels
                out["messages"] = [
                    {**m, "label": threshold_label(m["label"], t, where)}
                    if isinstance(m, dict) and "label" in m
                    else m
                    for m in out["messages"]
                ]
        return out


def _lookup(row: dict, path: str) -> tuple[bool, Any]:
    if path in row:
        return True, row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _relabel_messages(row: dict, source: str) -> bool:
    """Per-message labels stored under `source` on assistant messages -> `label`."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not any(isinstance(m, dict) and source in m for m in msgs):
        return False
    row["messages"] = [
        ({**{k: v for k, v in m.items() if k != source}, "label": m[source]})
        if isinstance(m, dict) and source in m
        else m
        for m in msgs
    ]
    return True


def threshold_label(value: Any, threshold: float, where: str) -> Any:
    """Numeric rating (or numeric string) -> value >= threshold; other values unchanged
    (bools and thumbs words are parsed as usual by `data.parse_label`)."""
    if isinstance(value, bool) or value is None:
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value  # a word: "thumbs_up", "bad", ... or an error in parse_label
    if isinstance(number, (int, float)):
        if isinstance(number, float) and math.isnan(number):
            raise UserError(f"{where}: label is NaN; every row needs a rating")
        return number >= threshold
    return value
