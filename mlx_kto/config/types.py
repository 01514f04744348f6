"""Every config value checked against its field's declared type, in one place.

YAML files, CLI flags and Python callers all pass here (`check_types`, called by
`KTOConfig.validate`; the YAML loader calls `coerce` per key to name the file and line):

    bool        True / False only. A string is refused, "false" included: bool("false")
                is True, which once trained a DoRA adapter or quantized a base to 4 bits.
    int         an integer, a whole float (2.0) or a string of one ("100").
    float       a number or a numeric string (PyYAML reads `5e-6` as a string); finite
                only: NaN passes every `x <= 0` check and `label_threshold: .nan` made
                every row undesirable.
    str         text (an integer is taken as its digits: `run_name: 2024`).
    list[str]   a list of strings, or one comma-separated string.
    Any         desirable_weight: a finite number or 'auto'.
A field whose type includes None takes None (unset).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mlx_kto.errors import UserError

# Field -> flag where the flag is not `--` + the field name with dashes (cli.py builds one
# flag per field that way, so none differ today; add any that ever do).
FLAGS: dict[str, str] = {}


def flag(name: str) -> str:
    """The flag a user types for config field `name` (`q_group_size` -> `--q-group-size`)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def bad(name: str, msg: str) -> UserError:
    """A UserError naming the flag and, for YAML users, the field: `--seed (seed): ...`."""
    return UserError(f"{flag(name)} ({name}): {msg}")


class BadValue(ValueError):
    """A value that does not fit its field's type; the caller adds where it came from."""


def kind(f: dataclasses.Field) -> tuple[str, bool]:
    """(base type, None allowed) of a field declared as a string annotation:
    'int | None' -> ('int', True), 'list[str] | None' -> ('list', True), 'Any' -> ('any', True)."""
    parts = [p.strip() for p in str(f.type).split("|")]
    base = next((p for p in parts if p != "None"), "None").split("[")[0].lower()
    return base, "None" in parts


def shape(value: Any) -> str:
    """How a value reads in an error: 'a list', 'a mapping', the string 'x', 3."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return repr(value)


def _number(value: Any, what: str) -> float:
    """A finite float from a number or a numeric string, else BadValue."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadValue(f"expected {what}, got {shape(value)}")
    try:
        number = float(value.strip()) if isinstance(value, str) else float(value)
    except (ValueError, OverflowError):
        raise BadValue(f"expected {what}, got {shape(value)}") from None
    if not math.isfinite(number):
        raise BadValue(f"{value} is not a finite number")
    return number


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """`value` as field `f`'s declared type (see the module docstring), or BadValue."""
    base, optional = kind(f)
    if value is None:
        if optional:
            return None
        raise BadValue("needs a value (leave the field out for its default)")
    if base == "bool":
        if isinstance(value, bool):
            return value
        hint = " (write true or false without quotes)" if isinstance(value, str) else ""
        raise BadValue(f"expected true or false, got {shape(value)}{hint}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value, "a whole number")
        if not number.is_integer():
            raise BadValue(f"expected a whole number, got {value}")
        return int(number)
    if base == "float":
        return _number(value, "a number")
    if base == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise BadValue(f"expected text, got {shape(value)}")
    if base == "list":
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise BadValue(f"expected a list of names, got {shape(value)}")
    if base == "any" and f.name == "desirable_weight":
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        return _number(value, "a number or 'auto'")
    return value


def check_types(cfg) -> None:
    """Coerce every field of the dataclass `cfg` to its declared type in place, or raise
    UserError naming the flag and the field."""
    for f in dataclasses.fields(cfg):
        try:
            setattr(cfg, f.name, coerce(f, getattr(cfg, f.name)))
        except BadValue as e:
            raise bad(f.name, str(e)) from None
