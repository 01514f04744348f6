"""The `mlx-kto` group, its commands (one module per command group) and `run`, which turns
a user mistake into one line on stderr. Parsing only: the work is in the library."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from mlx_kto import __version__
from mlx_kto.cli.cache import cache
from mlx_kto.cli.collect import chat
from mlx_kto.cli.convert import convert
from mlx_kto.cli.data import data_group
from mlx_kto.cli.demo import demo
from mlx_kto.cli.deps import invoked, missing_message
from mlx_kto.cli.generate import generate_command
from mlx_kto.cli.judge import compare, plot
from mlx_kto.cli.options import HELP
from mlx_kto.cli.rounds import rounds
from mlx_kto.cli.train import build_config, eval_command, train_command
from mlx_kto.errors import UserError
from mlx_kto.runtime import torchless as _torchless
from mlx_kto.train.guard import Interrupted

import click

__all__ = ["build_config", "cli", "main", "run", "train_command"]


@click.group(context_settings=HELP)
@click.version_option(__version__, prog_name="mlx-kto")
def cli():
    """KTO (Kahneman-Tversky Optimization) LoRA training for local models with MLX.

    Train on thumbs-up / thumbs-down feedback, then export the adapter for
    mlx-lm, PEFT or llama.cpp."""


for _command in (
    train_command, eval_command, generate_command, data_group, convert, cache, demo, compare,
    plot, chat, rounds,
):  # fmt: skip
    cli.add_command(_command)


def run(command: click.Command, args: list[str] | None = None, prog_name: str | None = None):
    """Run a click command; user mistakes (and a missing optional package) become one line
    on stderr and exit 2; a training run stopped by SIGINT / SIGTERM prints how to resume
    and exits 130 / 143."""
    args = sys.argv[1:] if args is None else list(args)
    prog = prog_name or "mlx-kto"
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except Interrupted as e:
        train_cmd = f"{prog} train" if command is cli else prog
        resume = f"{train_cmd} --resume {shlex.quote(str(Path(e.run_dir).resolve()))}"
        click.echo(f"{e}; resume with: {resume}" if e.checkpoint else str(e), err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as e:
        msg = missing_message(e, invoked(command, args, prog))
        if msg is None:  # not an optional package: a bug, keep the traceback
            raise
        click.echo(f"error: {msg}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def main() -> None:
    _torchless.keep_out()  # this process is a command: torch stays out (runtime/torchless.py)
    run(cli, prog_name="mlx-kto")


if __name__ == "__main__":
    main()
