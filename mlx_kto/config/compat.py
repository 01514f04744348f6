"""Names users bring from mlx-lm (`mlx_lm.lora -c`) and TRL (`KTOConfig`, `TrainingArguments`,
TRL's script arguments), in a YAML file or as `KTOConfig(...)` keyword arguments: each one
is mapped to our field with a note, or refused by name with the field to use
(mlx_lm_names.py, trl_names.py). Paths in a YAML file resolve relative to that file.

`translate(raw, path, names, log)` turns a YAML mapping into {our_field: value};
`translate_kwargs` does the same for keyword arguments; `config.loader` and
`KTOConfig.validate` then check the values against the field types.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_kto.config import trl_names
from mlx_kto.config.mlx_lm_names import MLX_LM, lr_schedule
from mlx_kto.config.translators import Translator, suggest
from mlx_kto.errors import UserError

# Inputs: resolved against the YAML's folder when they exist there (a hub id stays as is).
INPUT_PATHS = ("model", "data", "init_adapter", "resume", "chat_template")
# Outputs: always relative to the YAML's folder.
OUTPUT_PATHS = ("adapter_path", "ref_cache")

# Our own names whose value can also come in the other tools' form.
OWN_FORMS: dict[str, Translator] = {
    "lr_schedule": lr_schedule,  # mlx-lm: a mapping
    "report_to": trl_names.report_to,  # TRL: a list
    "warmup_steps": trl_names.warmup_steps,  # transformers 5: a float share
}

ALIASES: dict[str, Translator] = {**MLX_LM, **trl_names.TRL}


def resolve_paths(values: dict, base: Path, log: Callable[[str], None], where: str) -> dict:
    """Make relative paths in `values` relative to `base` (the YAML's folder)."""
    for name in INPUT_PATHS + OUTPUT_PATHS:
        v = values.get(name)
        if not isinstance(v, str) or not v or os.path.isabs(os.path.expanduser(v)):
            continue
        if "\n" in v or "{" in v:  # an inline chat template, not a path
            continue
        here = os.path.abspath(base / v)
        if name in OUTPUT_PATHS or os.path.exists(here):
            values[name] = here
        elif os.path.exists(v):
            log(
                f"note: {where}: {name} '{v}' is not next to the YAML file; using ./{v} "
                "(paths in a YAML file are relative to the file)"
            )
    return values


def translate_mapping(
    raw: dict,
    names: set[str],
    where_of: Callable[[str], str],
    log: Callable[[str], None],
    origins: dict[str, str] | None = None,
) -> dict:
    """{key: value} in our, mlx-lm's or TRL's names -> {our_field: value}. `where_of(key)`
    locates a key in errors; notes go to `log`; `origins` gets field -> the key that set it."""
    out: dict[str, Any] = {}
    origin = {} if origins is None else origins
    notes = []
    for key, value in raw.items():
        name, where = str(key).replace("-", "_"), where_of(key)
        if name in OWN_FORMS:
            mapped, note = OWN_FORMS[name](str(key), value, where)
        elif name in names:
            mapped, note = {name: value}, None
        elif name in ALIASES:
            mapped, note = ALIASES[name](str(key), value, where)
        else:
            hint = suggest(name, sorted(names | set(ALIASES)))
            raise UserError(f"{where}: unknown field '{key}'{hint} (see `mlx-kto train --help`)")
        for field, v in mapped.items():
            if field in out and out[field] != v:
                raise UserError(
                    f"{where}: '{key}' and '{origin[field]}' both set {field} "
                    f"({v!r} vs {out[field]!r}); keep one"
                )
            out[field], origin[field] = v, str(key)
        if note:
            notes.append(note)
    if out.get("warmup_steps") == 0 and "warmup_ratio" in out:
        # TRL: warmup_steps (default 0) only overrides warmup_ratio when > 0.
        del out["warmup_steps"]
        notes.append("'warmup_steps: 0' with warmup_ratio: the ratio applies (as in TRL)")
    where = where_of("")
    mapped = [n for n in notes if n.startswith("'") and "' -> '" in n and ";" not in n]
    if mapped:  # plain renames on one line, everything else (ignored, refused parts) apart
        log(f"note: {where}: names mapped: " + ", ".join(n.replace("'", "") for n in mapped))
    for note in notes:
        if note not in mapped:
            log(f"note: {where}: {note}")
    return out


def translate(
    raw: dict,
    path: Path,
    names: set[str],
    log: Callable[[str], None] | None = None,
    lines: dict[str, int] | None = None,
    origins: dict[str, str] | None = None,
) -> dict:
    """A YAML file's mapping -> {our_field: value}; errors name the file and the key's line
    (`lines`: key -> line); relative paths resolve against the file's folder."""
    log = log or (lambda m: None)
    lines = lines or {}

    def where_of(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    out = translate_mapping(raw, names, where_of, log, origins)
    return resolve_paths(out, path.parent, log, str(path))


def translate_kwargs(kwargs: dict, names: set[str], log: Callable[[str], None] | None = None):
    """`KTOConfig(...)` keyword arguments in our or TRL's names -> {our_field: value}.
    Notes (names mapped, ignored) go to `log`, default stderr; ours pass straight through."""
    if names.issuperset(kwargs):
        return dict(kwargs)
    if log is None:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    return translate_mapping(kwargs, names, lambda key: "KTOConfig", log)


def trl_read(name: str) -> str | None:
    """Our field behind TRL's attribute `name` (`output_dir` -> `adapter_path`), or None."""
    return trl_names.READS.get(name)


REPORTERS = ("wandb", "tensorboard", "none")


def report_targets(report_to: str | None) -> list[str]:
    """'wandb,tensorboard' -> ['wandb', 'tensorboard']; 'none' / '' -> []."""
    names = [n.strip().lower() for n in str(report_to or "none").split(",") if n.strip()]
    return [n for n in names if n != "none"]


def validate_habits(cfg) -> None:
    """Checks of the fields added for mlx-lm / TRL habits; UserError names the field."""
    if cfg.fine_tune_type not in ("lora", "dora"):
        raise UserError(f"fine_tune_type: '{cfg.fine_tune_type}' is not lora or dora")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError("warmup_ratio: must be in [0, 1)")
    for name in str(cfg.report_to or "none").split(","):
        if name.strip().lower() not in REPORTERS:
            raise UserError(
                f"report_to: '{name.strip()}' is not one of {', '.join(REPORTERS)}"
                f"{suggest(name.strip().lower(), REPORTERS)}"
            )
