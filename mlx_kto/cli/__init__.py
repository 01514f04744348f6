"""The `mlx-kto` command line: click commands only, one file per command group. Nothing in
the library imports this package.

`main` (the `mlx-kto` entry point) marks torch absent before the commands' imports reach
transformers (runtime/torchless.py: ~180 MB resident and 1.5-3 s of startup saved), so the
command modules load on first use here rather than at the top."""

from __future__ import annotations

from mlx_kto.runtime import torchless


def main() -> None:
    """`mlx-kto`: keep torch out, then run the click group."""
    torchless.keep_out()
    from mlx_kto.cli import app  # after keep_out: see the module docstring

    app.main()


def __getattr__(name: str):
    if name == "cli":  # the click group, for `from mlx_kto.cli import cli`
        from mlx_kto.cli import app  # lazily, as in main

        return app.cli
    raise AttributeError(f"module 'mlx_kto.cli' has no attribute {name!r}")


__all__ = ["cli", "main"]
