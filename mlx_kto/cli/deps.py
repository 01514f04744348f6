"""Optional dependencies, reported by name when the command that needs one runs.

Every command is registered whatever is installed (a bug in a command's module fails
loudly at start-up). A package only some commands use and a partial install may lack is
imported when used; if it is missing, the user reads which command needs it and the pip
line, not a traceback. Any other missing module is a bug and keeps its traceback."""

from __future__ import annotations

import importlib.util

import click

# top-level package -> what to pip install
OPTIONAL = {
    "starlette": "starlette uvicorn",
    "uvicorn": "starlette uvicorn",
    "matplotlib": "matplotlib",
    "datasets": "'mlx-kto[hf]'",
    "pyarrow": "'mlx-kto[hf]'",
    "gguf": "'mlx-kto[convert]'",
    "wandb": "wandb",
    "tensorboardX": "tensorboardX",
    "peft": "peft",
}


def invoked(command: click.Command, args: list[str], prog: str) -> str:
    """The command words a user typed (`mlx-kto chat`), plus the on/off flags given to the
    innermost command (`--web`): what needed the package."""
    words, cmd = [prog], command
    rest = list(args)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            break
        words.append(rest.pop(0))
        cmd = sub
    for p in getattr(cmd, "params", []):
        if isinstance(p, click.Option) and p.is_flag:
            words += [o for o in p.opts if o in rest and o.startswith("--")]
    return " ".join(words)


def missing_message(err: ModuleNotFoundError, what: str) -> str | None:
    """`` `mlx-kto chat --web` needs starlette: pip install starlette uvicorn ``, or None
    when the missing module is not an optional dependency (a bug)."""
    top = (err.name or "").split(".")[0]
    if top not in OPTIONAL:
        return None
    return f"`{what}` needs {top}: pip install {OPTIONAL[top]}"


def require(*packages: str) -> None:
    """Raise ModuleNotFoundError for the first of `packages` that is not installed, before
    a command loads a model it could not use (the CLI reports it by name)."""
    for name in packages:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
