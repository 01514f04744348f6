"""`mlx-kto data check` and `mlx-kto data import` (the importer's command is in cli/collect)."""

from __future__ import annotations

from mlx_kto.cli.collect import import_command
from mlx_kto.cli.options import HELP, column_options
from mlx_kto.config.core import make_config
from mlx_kto.data.check import data_check_lines
from mlx_kto.data.columns import FieldMap
from mlx_kto.model.inference import load_tokenizer

import click


@click.group("data", context_settings=HELP)
def data_group():
    """Inspect feedback data."""


@data_group.command("check", context_settings=HELP)
@click.argument("path")
@click.option("--model", default=None, help="Also tokenize with this model's tokenizer.")
@click.option("--max-length", default=1024, show_default=True, type=int)
@click.option(
    "--max-prompt-length", default=None, type=int, help="As for train: keep the last N tokens."
)
@click.option("--chat-template", default=None, help="Chat template file or text (see train).")
@click.option("--data-split", default=None, help="Training split of a hub dataset id.")
@column_options
def data_check(path, model, max_length, max_prompt_length, chat_template, data_split, **mapping):
    """Validate feedback data: format, input shapes, class balance; with --model one
    rendered example (prompt/completion boundary marked) and the effect of truncation."""
    cfg = make_config(None, max_length=max_length, max_prompt_length=max_prompt_length, **mapping)
    tok = load_tokenizer(model, chat_template) if model else None
    for line in data_check_lines(
        path, tok, max_length, max_prompt_length, split=data_split, fields=FieldMap.from_config(cfg)
    ):
        click.echo(line)


data_group.add_command(import_command)  # `mlx-kto data import`
