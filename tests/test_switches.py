"""One table lists every MLX_KTO_* environment switch (runtime/switches.py), and the README's
table is that table."""

import os
import re
import subprocess
import sys
from pathlib import Path

from mlx_kto.runtime import switches, tape
from mlx_kto.runtime.switches import SWITCHES, Switch, markdown_table

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"MLX_KTO_[A-Z0-9_]*[A-Z0-9]")


def _names_in(folder: str) -> dict[str, str]:
    """{switch name: first file naming it} over the folder's source files."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder).rglob("*")):
        if path.suffix not in (".py", ".sh", ".toml", ".yaml", ".yml") or not path.is_file():
            continue
        for name in NAME.findall(path.read_text(errors="replace")):
            found.setdefault(name, str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder", ["mlx_kto", "bench", "tests", ".ci", "examples"])
def test_every_switch_named_in_the_code_is_in_the_table(folder):
    listed = {s.name for s in SWITCHES}
    missing = {n: f for n, f in _names_in(folder).items() if n not in listed}
    assert not missing, f"MLX_KTO_* names missing from runtime/switches.py: {missing}"


def test_every_listed_switch_is_used_and_documented():
    used = {**_names_in("mlx_kto"), **_names_in("bench"), **_names_in("tests")}
    used.update(_names_in(".ci"))
    for s in SWITCHES:
        assert s.name in used and s.why and s.default and s.values
        assert s.scope in ("run", "bench", "tests")
    assert len({s.name for s in SWITCHES}) == len(SWITCHES)
    # every entry of the module is in the table
    entries = [v for v in vars(switches).values() if isinstance(v, Switch)]
    assert set(entries) == set(SWITCHES)


def test_readme_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- switches:begin -->\n(.*?)\n<!-- switches:end -->", readme, re.S)
    assert m, "README.md lost its switches table markers"
    assert m.group(1) == markdown_table(), (
        "README's switch table is stale: regenerate it from runtime.switches.markdown_table()"
    )
    for row in m.group(1).splitlines()[2:]:
        assert row.count("|") == 5, f"a value breaks the table: {row}"


def test_switch_reading(monkeypatch):
    s = switches.FAST_EXP
    monkeypatch.delenv(s.name, raising=False)
    assert s.raw() is None and not s.is_set() and s.flag() is None
    monkeypatch.setenv(s.name, "")
    assert s.raw() is None and s.flag() is None
    monkeypatch.setenv(s.name, "0")
    assert s.is_set() and s.flag() is False
    monkeypatch.setenv(s.name, "1")
    assert s.flag() is True
    monkeypatch.setenv(s.name, "yes")
    assert s.is_set() and s.flag() is None


def test_tape_width_is_set_for_training_but_not_for_checkpointing(monkeypatch):
    """runtime/tape.py: a training run on Linux widens MLX's tape unless it checkpoints; the
    user's own $MLX_BFS_MAX_WIDTH stands; $MLX_KTO_TAPE_WIDTH overrides both."""
    monkeypatch.setattr(tape.platform, "system", lambda: "Linux")
    for var in (tape.MLX_VAR, "MLX_KTO_TAPE_WIDTH"):
        monkeypatch.setenv(var, "1")  # restored (or removed) after the test
        monkeypatch.delenv(var)
    assert tape.width_for(grad_checkpoint=True) is None
    assert tape.width_for() == str(tape.WIDTH)
    monkeypatch.setenv(tape.MLX_VAR, "50")
    assert tape.width_for() is None  # the user's own
    monkeypatch.setenv("MLX_KTO_TAPE_WIDTH", "300")
    assert tape.width_for(grad_checkpoint=True) == "300"
    monkeypatch.delenv("MLX_KTO_TAPE_WIDTH")
    monkeypatch.delenv(tape.MLX_VAR)
    monkeypatch.setattr(tape.platform, "system", lambda: "Darwin")
    assert tape.width_for() is None


def test_widen_leaves_no_width_for_child_processes():
    """A training process sets the width for its own MLX only: a checkpointed run it starts
    must not inherit a wide tape (it would undo checkpointing; the memory test in
    tests/test_packing.py failed that way when run after an in-process training test)."""
    code = (
        "import os, platform; from mlx_kto.runtime import tape; "
        "platform.system = lambda: 'Linux'; "
        "print(tape.widen(), os.environ.get(tape.MLX_VAR))"
    )
    env = {k: v for k, v in os.environ.items() if k not in (tape.MLX_VAR, "MLX_KTO_TAPE_WIDTH")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tape.WIDTH), "None"]
