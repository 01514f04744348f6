"""Building blocks of the name tables (mlx_lm_names.py, trl_names.py).

A translator gets (key, value, where) and returns ({our_field: value}, note or None), or
raises UserError naming `where` (the file and line, or "KTOConfig") and the key. Values
that feed a field are type-checked later against the field (config/types.py); a
translator checks only what it reads itself (a flag that must be a boolean, a mapping
it walks), so a wrong shape is one line instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from mlx_kto.config.types import shape
from mlx_kto.errors import UserError

Translator = Callable[[str, Any, str], tuple[dict, str | None]]


def suggest(name: str, candidates) -> str:
    """' (did you mean 'x'?)' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def boolean(value: Any, key: str, where: str) -> bool:
    """A YAML / Python boolean, or UserError: the string "false" is true to Python."""
    if isinstance(value, bool):
        return value
    hint = " (write true or false without quotes)" if isinstance(value, str) else ""
    raise UserError(f"{where}: '{key}': expected true or false, got {shape(value)}{hint}")


def mapping(value: Any, key: str, where: str, of: str = "") -> dict:
    """`value` if it is a mapping, else UserError naming what it should hold."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be a mapping{of}, got {shape(value)}")
    return value


def to(field: str, fn: Callable[[Any, str, str], Any] | None = None, why: str = "") -> Translator:
    """A rename (`key` -> `field`), the value passed through `fn(value, key, where)`."""

    def apply(key, value, where):
        v = fn(value, key, where) if fn else value
        return {field: v}, f"'{key}' -> '{field}'{why}"

    return apply


def refuse(hint: str) -> Translator:
    """A name with no equivalent: refused by name with what to use instead (unset is fine)."""

    def apply(key, value, where):
        if value is None:  # written out but unset
            return {}, None
        raise UserError(f"{where}: '{key}' is not supported: {hint}")

    return apply


def ignore(why: str, ok: Callable[[Any], bool] = lambda v: True, hint: str = "") -> Translator:
    """Accept the key without effect (with a note) when `ok(value)`, else refuse with `hint`.
    Only for names whose value cannot change the trained adapter (README's table)."""

    def apply(key, value, where):
        if not ok(value):
            raise UserError(f"{where}: '{key}: {value!r}' is not supported: {hint}")
        return {}, (f"'{key}' ignored: {why}" if why else None)

    return apply


def ignore_unless(why: str, on: bool, hint: str) -> Translator:
    """A boolean switch that has no effect here while it is `not on`; `on` is refused."""

    def apply(key, value, where):
        if value is None or boolean(value, key, where) != on:
            return {}, (f"'{key}' ignored: {why}" if why else None)
        raise UserError(f"{where}: '{key}: {str(on).lower()}' is not supported: {hint}")

    return apply


def ignore_bool(why: str) -> Translator:
    """A boolean switch without effect here either way (a string is still refused)."""

    def apply(key, value, where):
        if value is not None:
            boolean(value, key, where)
        return {}, f"'{key}' ignored: {why}"

    return apply


def ignore_if_unset(hint: str) -> Translator:
    """Fine while empty (None, false, {}, []); anything else is refused with `hint`."""

    def apply(key, value, where):
        if value in (None, False, {}, [], ""):
            return {}, None
        raise UserError(f"{where}: '{key}' is not supported: {hint}")

    return apply


SCHEDULERS = {
    "cosine": "cosine",
    "cosine_decay": "cosine",
    "linear": "linear",
    "linear_schedule": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


def scheduler(value, key, where) -> str:
    """mlx-lm's and transformers' schedule names -> ours (each after a linear warmup)."""
    if not isinstance(value, str) or value not in SCHEDULERS:
        raise UserError(
            f"{where}: '{key}: {value}' is not supported (lr_schedule is one of cosine, linear, "
            "constant; each after a linear warmup)"
        )
    return SCHEDULERS[value]


def optimizer(key, value, where):
    """TRL's `optim`, mlx-lm's `optimizer`: AdamW names only."""
    if isinstance(value, str) and value.lower() in (
        "adam", "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf",
    ):  # fmt: skip
        return {}, f"'{key}: {value}': the optimizer is AdamW (Adam when weight_decay is 0)"
    raise UserError(f"{where}: '{key}: {value}' is not supported: the optimizer is AdamW")
