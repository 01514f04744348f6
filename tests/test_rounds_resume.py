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


@pytest.mark.slow
def test_sigkill_mid_round_resumes_to_the_same_adapter(tmp_path):
    straight = tmp_path / "straight"
    r = mlx_kto(*tiny_args(tmp_path, straight))
    assert r.returncode == 0, r.stderr

    out = tmp_path / "killed"
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_kto.cli", *tiny_args(tmp_path, out)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines, in_round_2 = [], False
    for line in p.stderr:
        lines.append(line)
        in_round_2 = in_round_2 or line.startswith("round 2: training")
        if in_round_2 and line.startswith("step 3/"):  # after the step-2 checkpoint
            os.kill(p.pid, signal.SIGKILL)
            break
    p.wait(timeout=120)
    assert p.returncode == -signal.SIGKILL, "".join(lines)
    assert not (out / "round-2" / "train.json").exists()  # really mid-round
    before = stamps(out)
    assert "round-2/feedback.jsonl" in before and "round-1/train.json" in before

    r = mlx_kto("rounds", "--resume", str(out))
    assert r.returncode == 0, r.stderr
    assert re.search(r"round 2: training resumes from step_000000[2-9]\n", r.stderr), r.stderr
    assert "sampling" not in r.stderr.split("resuming")[1].split("round 2: held")[0]
    after = stamps(out)
    assert {k: after[k] for k in before} == before  # nothing on disk written again
    for name in ("round-1", "round-2"):
        a, b = adapter(straight / name), adapter(out / name)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name} {k}")
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
