"""Click options built from the config dataclass: one flag per KTOConfig field, its help
text from the field's metadata (so a new field is a new flag with no CLI code)."""

from __future__ import annotations

import dataclasses

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.columns import CONFIG_FIELDS

import click

HELP = {"help_option_names": ["-h", "--help"]}  # context_settings of every command


def _option_for(f: dataclasses.Field):
    name = f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    default = f.default
    if default is not None and default != "" and not isinstance(default, bool):
        help_ += f" [default: {default}]"
    t = str(f.type)
    if t.startswith("bool"):
        if f.name.startswith("no_"):
            return click.option(f"--{name}", f.name, is_flag=True, default=None, help=help_)
        return click.option(f"--{name}/--no-{name}", f.name, default=None, help=help_)
    if f.name == "desirable_weight":
        kind = click.STRING
    elif t.startswith("int"):
        kind = click.INT
    elif t.startswith("float"):
        kind = click.FLOAT
    else:
        kind = click.STRING
    return click.option(f"--{name}", f.name, type=kind, default=None, help=help_)


def config_options(func):
    """One CLI flag per KTOConfig field (help text from the dataclass)."""
    for f in reversed(dataclasses.fields(KTOConfig)):
        func = _option_for(f)(func)
    return click.option(
        "-c",
        "--config",
        "config_file",
        type=click.Path(),
        default=None,
        help="YAML file of config fields; flags given on the command line override it.",
    )(func)


def column_options(func):
    """--label-field / --prompt-field / ... / --label-threshold (KTOConfig's mapping fields)."""
    for f in reversed([f for f in dataclasses.fields(KTOConfig) if f.name in CONFIG_FIELDS]):
        func = _option_for(f)(func)
    return func
