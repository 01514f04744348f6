"""The `mlx-kto` command line: click commands only, one file per command group. Nothing in
the library imports this package."""

from mlx_kto.cli.app import cli, main

__all__ = ["cli", "main"]
