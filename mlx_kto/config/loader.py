"""Loading a YAML config file into KTOConfig fields, and `make_config`: defaults < YAML <
explicit overrides, validated."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from mlx_kto.config.compat import translate
from mlx_kto.config.fields import KTOConfig, field_names
from mlx_kto.errors import UserError

import yaml


def _coerce(name: str, value: Any, where: str) -> Any:
    """Coerce a YAML value to the field's declared type, or raise UserError."""
    f = {f.name: f for f in dataclasses.fields(KTOConfig)}[name]
    t = str(f.type)
    if value is None:
        return None
    try:
        if name == "desirable_weight":
            return value if isinstance(value, str) else float(value)
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ValueError
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: field '{name}' has a bad value {value!r} (expected {t})"
        ) from None
    return value


def load_yaml(path: str | Path, log=None) -> dict:
    """Read a YAML config into a dict of known fields; unknown keys are errors. mlx-lm and
    TRL names are mapped (config_compat; notes to `log`, default stderr); relative paths
    resolve against the file's folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a YAML file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of field: value")
    if log is None:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    values = translate(raw, path, set(field_names()), log)
    return {name: _coerce(name, value, str(path)) for name, value in values.items()}


def make_config(yaml_path: str | Path | None = None, **overrides) -> KTOConfig:
    """Build a validated config: defaults < YAML file < explicit overrides (None = unset)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KTOConfig(**values).validate()
