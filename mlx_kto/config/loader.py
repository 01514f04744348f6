"""Loading a YAML config file into KTOConfig fields, and `make_config`: defaults < YAML <
explicit overrides, validated.

YAML's own types are kept and checked per field (config/types.py): `use_dora: false` is
false, `use_dora: "false"` is refused. A key given twice is refused naming both lines (a
YAML parser keeps the last one without a word). Every error names the file, the line and
the key.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from mlx_kto.config.compat import translate
from mlx_kto.config.fields import KTOConfig, field_names
from mlx_kto.config.types import BadValue, coerce
from mlx_kto.errors import UserError

import yaml


def _refuse_duplicates(node, path: Path, prefix: str = "") -> None:
    """Walk a composed YAML document; a mapping with a key given twice is an error."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise UserError(
                        f"{path}:{line}: '{prefix}{key.value}' is given twice (lines {seen[key.value]} "
                        f"and {line}); keep one"
                    )
                seen[key.value] = line
            name = key.value if isinstance(key, yaml.ScalarNode) else "?"
            _refuse_duplicates(value, path, f"{prefix}{name}.")
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicates(item, path, prefix)


def read_yaml(path: Path) -> tuple[object, dict[str, int]]:
    """(the document, {top-level key: line}) of a YAML file; one-line errors for a missing,
    unreadable or invalid file and for a key given twice."""
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a YAML file") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        _refuse_duplicates(node, path)
        doc = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    finally:
        loader.dispose()
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if hasattr(k, "value")}
    return doc, lines


def load_yaml(path: str | Path, log=None) -> dict:
    """Read a YAML config into a dict of known fields, each checked against its type;
    unknown keys are errors. mlx-lm and TRL names are mapped (compat.py; notes to `log`,
    default stderr); relative paths resolve against the file's folder."""
    path = Path(path)
    raw, lines = read_yaml(path)
    if raw is None or raw == "":
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of field: value")
    if log is None:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    origins: dict[str, str] = {}
    values = translate(raw, path, set(field_names()), log, lines, origins)
    fields = {f.name: f for f in dataclasses.fields(KTOConfig)}
    out = {}
    for name, value in values.items():
        try:
            out[name] = coerce(fields[name], value)
        except BadValue as e:
            key = origins.get(name, name)
            where = f"{path}:{lines[key]}" if key in lines else str(path)
            what = f"'{key}'" + ("" if key == name else f" ({name})")
            raise UserError(f"{where}: {what}: {e}") from None
    return out


def make_config(yaml_path: str | Path | None = None, **overrides) -> KTOConfig:
    """Build a validated config: defaults < YAML file < explicit overrides (None = unset)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KTOConfig(**values).validate()
