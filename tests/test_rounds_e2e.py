"""The README's `mlx-kto rounds` command on the shipped demo model, run as a user runs it
(read from the README, a subprocess from the repository root): rounds.json holds rounds
0, 1, 2 with their fields, the files are there, and `--resume OUT` on the finished run
prints the same table without doing anything again. Asserts only what any machine gives
(not the measured shares: another BLAS or CPU may sample other replies)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("round", "heldout_share", "rows", "desirable", "distinct_2", "self_bleu", "adapter")


def readme_command() -> list[str]:
    """The first `mlx-kto rounds --model mlx_kto/demo/assets/model ...` command of the README
    (backslash continuations joined), as argv after `mlx-kto`."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"^mlx-kto rounds --model mlx_kto/demo/assets/model(?:.*\\\n)*.*$", text, re.M)
    assert m, "the README lost its rounds command"
    return shlex.split(m.group(0).replace("\\\n", " "))[1:]


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *args], cwd=REPO, capture_output=True,
        text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_readme_rounds_command_on_the_demo_model(tmp_path):
    args = readme_command()
    out = tmp_path / "kto-rounds"
    args[args.index("--adapter-path") + 1] = str(out)
    r = run(args)
    assert r.returncode == 0, r.stderr
    records = json.loads((out / "rounds.json").read_text())
    assert [x["round"] for x in records] == [0, 1, 2]
    for x in records:
        assert set(FIELDS) <= set(x) and 0 <= x["heldout_share"] <= 1
    assert records[0]["adapter"] is None and records[0]["rows"] is None
    for r_ in (1, 2):
        folder = out / f"round-{r_}"
        assert records[r_]["adapter"] == str(folder)
        rows = (folder / "feedback.jsonl").read_text().splitlines()
        assert len(rows) == records[r_]["rows"] > 0
        assert sum(json.loads(x)["label"] for x in rows) == records[r_]["desirable"]
        for name in ("adapters.safetensors", "adapter_config.json", "heldout.json", "train.json"):
            assert (folder / name).is_file(), name
    assert (out / "round-0" / "heldout.json").is_file() and (out / "rounds.png").stat().st_size
    table = [line for line in r.stdout.splitlines() if line.strip()]
    assert table[0].split()[:3] == ["round", "rows", "desirable"] and len(table) >= 5

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and
              p.name in ("feedback.jsonl", "heldout.json", "train.json", "adapters.safetensors")}  # fmt: skip
    again = run(["rounds", "--resume", str(out)])
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[:5] == r.stdout.splitlines()[:5]  # the same table
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing done again
    assert json.loads((out / "rounds.json").read_text()) == records
