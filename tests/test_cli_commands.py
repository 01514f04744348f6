"""The command line as a thin layer: every command is registered whatever is installed; a
missing optional package is one line naming the command and the pip line; a bug in a
command's module fails loudly instead of removing the command."""

from __future__ import annotations

import os
import subprocess
import sys

from mlx_kto.cli.app import cli, run

import click
import pytest

COMMANDS = {"cache", "chat", "compare", "convert", "data", "demo", "eval", "generate", "plot",
            "rounds", "train"}  # fmt: skip

# Runs the CLI with some imports made to fail, as they fail in a partial install
# (ModuleNotFoundError) or in a module with a bug (ImportError of a name).
BLOCKER = """
import importlib.abc, sys
missing, broken = sys.argv[1].split(",") if sys.argv[1] else [], sys.argv[2]
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in missing:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name == broken:
            raise ImportError(f"cannot import name 'oops' from {name!r}")
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["mlx-kto", *sys.argv[3:]]
from mlx_kto.cli import main
main()
"""


def _cli(missing: str, broken: str, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, missing, broken, *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=dict(os.environ),
    )  # fmt: skip


def test_every_command_is_registered():
    assert set(cli.commands) == COMMANDS
    assert set(cli.commands["data"].commands) == {"check", "import"}


def test_missing_optional_package_is_named_by_the_command_that_needs_it(tmp_path):
    """`chat --web` without starlette: one line, exit 2, before any model is loaded; the
    rest of the CLI (and the terminal chat's help) still works."""
    p = _cli("starlette", "", "chat", "--web", "--feedback", "fb.jsonl", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: `mlx-kto chat --web` needs starlette: pip install starlette uvicorn"
    ], p.stderr
    assert not (tmp_path / "fb.jsonl").exists()
    p = _cli("starlette,uvicorn,matplotlib", "", "--help")
    assert p.returncode == 0 and all(f"  {c} " in p.stdout for c in COMMANDS), p.stdout


def test_a_bug_in_a_command_module_fails_loudly():
    """Before, `except ImportError: continue` dropped `compare` and `plot` without a word."""
    p = _cli("", "mlx_kto.cli.judge", "--help")
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "cannot import name 'oops'" in p.stderr, p.stderr


def test_run_reports_optional_packages_and_reraises_other_missing_modules(capsys):
    @click.group()
    def group():
        pass

    @group.command("draw")
    @click.option("--fancy", is_flag=True)
    @click.option("--name", default="x")
    def draw(fancy, name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    with pytest.raises(SystemExit) as e:
        run(group, ["draw", "--fancy", "--name", "matplotlib.pyplot"], "mlx-kto")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: `mlx-kto draw --fancy` needs matplotlib: pip install matplotlib\n"
    with pytest.raises(ModuleNotFoundError, match="mlx_kto.nothing"):  # a bug: traceback
        run(group, ["draw", "--name", "mlx_kto.nothing"], "mlx-kto")


def test_documented_entry_points_import():
    from mlx_kto.cli import cli as cli2
    from mlx_kto.cli import main
    from mlx_kto.cli.app import build_config, train_command

    assert cli2 is cli and callable(main) and callable(build_config)
    assert train_command is cli.commands["train"]


def test_the_cli_starts_without_mlx_lm():
    """Importing the command line (every command registered) imports no mlx_lm: any mlx_lm
    import loads transformers, ~1 s of every command's start (more with torch). The commands
    that load a model import it then."""
    code = (
        "import sys, mlx_kto.cli.app\n"
        "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]", p.stdout
