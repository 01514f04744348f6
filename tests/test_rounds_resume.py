"""`mlx-kto rounds` killed with SIGKILL in the middle of a round resumes with `--resume OUT`
to exactly the adapter of an uninterrupted run (bit for bit, on the CPU), without sampling
or labelling again what is on disk."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "mlx_kto" / "demo" / "assets" / "model"
RULE = REPO / "examples" / "rounds" / "rule_polite.py"
PROMPTS = (REPO / "examples" / "rounds" / "demo_prompts.txt").read_text().splitlines()
HELDOUT = (REPO / "examples" / "rounds" / "demo_heldout.txt").read_text().splitlines()


def tiny_args(tmp: Path, out: Path) -> list[str]:
    """Two tiny rounds on the demo model: 14 prompts x 4 replies, 10 steps each, a checkpoint
    every 2 steps, a progress line every step (the test kills on one)."""
    (tmp / "p.txt").write_text("\n".join(PROMPTS[::4] + [""]))  # a blank line is skipped
    (tmp / "h.txt").write_text("\n".join(HELDOUT[:3]) + "\n")
    return [
        "rounds", "--model", str(MODEL), "--prompts", str(tmp / "p.txt"),
        "--heldout", str(tmp / "h.txt"), "--judge", f"{RULE}:polite", "--rounds", "2",
        "--samples-per-prompt", "4", "--heldout-samples", "2", "--max-tokens", "16",
        "--adapter-path", str(out), "--dtype", "float32", "--beta", "0.5",
        "--learning-rate", "1e-3", "--num-layers", "2", "--max-length", "64",
        "--batch-size", "8", "--iters", "10", "--steps-per-save", "2",
        "--steps-per-report", "1", "--quiet", "--seed", "0",
        "--min-gain", "-100",  # never stop early: both rounds run whatever the share does
    ]  # fmt: skip


def mlx_kto(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *args], capture_output=True, text=True,
        timeout=600, **kw,
    )  # fmt: skip


def adapter(folder: Path) -> dict:
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def stamps(out: Path) -> dict:
    """(inode, mtime) of every round artefact that must never be written twice."""
    files = [*out.glob("round-*/feedback.jsonl"), *out.glob("round-*/heldout.json"),
             *out.glob("round-*/train.json")]  # fmt: skip
    return {str(f.relative_to(out)): (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    tmp = tmp_path_factory.mktemp("straight")
    r = mlx_kto(*tiny_args(tmp, tmp / "out"))
    assert r.returncode == 0, r.stderr
    return tmp / "out"


def interrupt(args: list[str], after: str, at: str, signum: int) -> list[str]:
    """Run the command; once a line starting with `after` was printed, send `signum` at the
    first line starting with `at`. Returns the lines printed before."""
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_kto.cli", *args], stderr=subprocess.PIPE, text=True
    )
    lines, armed = [], False
    for line in p.stderr:
        lines.append(line)
        armed = armed or line.startswith(after)
        if armed and line.startswith(at):
            os.kill(p.pid, signum)
            break
    rest = p.communicate(timeout=120)[1]
    return lines + rest.splitlines(keepends=True), p.returncode


def assert_same_adapters(a_run: Path, b_run: Path) -> None:
    for name in ("round-1", "round-2"):
        a, b = adapter(a_run / name), adapter(b_run / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")


@pytest.mark.slow
def test_sigkill_mid_round_resumes_to_the_same_adapter(tmp_path, straight):
    out = tmp_path / "killed"
    # Round 2's training, after its step-2 checkpoint.
    lines, code = interrupt(
        tiny_args(tmp_path, out), "round 2: training", "step 3/", signal.SIGKILL
    )
    assert code == -signal.SIGKILL, "".join(lines)
    assert not (out / "round-2" / "train.json").exists()  # really mid-round
    before = stamps(out)
    assert "round-2/feedback.jsonl" in before and "round-1/train.json" in before

    r = mlx_kto("rounds", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert re.search(r"round 2: training resumes from step_000000[2-9]\n", r.stderr), r.stderr
    assert "sampling" not in r.stderr.split("resuming")[1].split("round 2: held")[0]
    after = stamps(out)
    assert {k: after[k] for k in before} == before  # nothing on disk written again
    assert_same_adapters(straight, out)
    for name in ("round-1/feedback.jsonl", "round-2/feedback.jsonl"):
        labels = [
            [(json.loads(x)["completion"][0]["content"], json.loads(x)["label"])
             for x in (d / name).read_text().splitlines()]
            for d in (straight, out)
        ]  # fmt: skip
        assert labels[0] == labels[1]
    recs = [json.loads((d / "rounds.json").read_text()) for d in (straight, out)]
    assert [x["round"] for x in recs[1]] == [0, 1, 2]
    for a, b in zip(*recs):
        assert a["heldout_share"] == b["heldout_share"] and a["rows"] == b["rows"]


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume_and_resumes_to_the_same_adapter(tmp_path, straight):
    """Ctrl-C while round 1 trains (checkpointed by train, exit 130) and, after a resume,
    while round 2 samples (that step is simply done again): each time one line names the
    command to continue; the end result is the uninterrupted run's."""
    out = tmp_path / "ctrl-c"
    again = f"resume with: mlx-kto rounds --resume {out}"
    lines, code = interrupt(tiny_args(tmp_path, out), "round 1: training", "step 3/", signal.SIGINT)
    assert code == 130 and lines[-1].strip().endswith(again), "".join(lines[-5:])
    assert "Traceback" not in "".join(lines)
    args = ["rounds", "--resume", str(out)]
    lines, code = interrupt(args, "round 2: sampling", "round 2: sampling", signal.SIGINT)
    assert code == 130 and lines[-1].strip().endswith(again), "".join(lines[-5:])
    assert "Traceback" not in "".join(lines)
    r = mlx_kto(*args)
    assert r.returncode == 0, r.stderr
    assert_same_adapters(straight, out)
