"""Data parallel over mx.distributed (ring backend, 2 ranks on loopback): the adapter equals a
single-process run with the same global batch; a killed rank ends the run with one line and
its last checkpoint resumes; a hung rank trips the watchdog; resume checks the world size."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx_kto
from mlx_kto.config.core import make_config
from mlx_kto.errors import UserError
from mlx_kto.train.checkpoint import list_checkpoints
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from feedback_fixtures import write_feedback

LAUNCH = Path(sys.executable).parent / "mlx.launch"
ROOT = Path(mlx_kto.__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,  # several processes: ~1-2 min on a busy 2-core machine
    pytest.mark.skipif(
        not mx.distributed.is_available("ring"), reason="this mlx build has no ring backend"
    ),
]


def _free_base_port(n=2) -> int:
    """A port p with p .. p+n-1 free on 127.0.0.1 (the ring backend listens on each)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _args(model, data, out, **kw):
    base = dict(
        model=model, data=data, adapter_path=out, iters=4, learning_rate=1e-3, warmup_steps=0,
        lora_rank=4, steps_per_eval=0, max_length=64, quiet=True, seed=0,
    )  # fmt: skip
    base.update(kw)
    return base


def _flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        else:
            out += [flag, str(v)]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("dp") / "train.jsonl"
    write_feedback(path, 48, seed=0, numbered=True)
    return path


def test_two_ranks_with_mlx_launch_equal_one_process(tiny_llama, data, tmp_path):
    """mlx.launch -n 2 (ring, 127.0.0.1), micro-batch 1 x accumulation 2 per rank, against one
    process with micro-batch 4: the same global batch of 4 rows, the same adapter."""
    one = train(
        make_config(None, **_args(str(tiny_llama), str(data), str(tmp_path / "one"), batch_size=4)),
        log=lambda *_: None,
    )
    two_dir = tmp_path / "two"
    args = _args(str(tiny_llama), str(data), str(two_dir), batch_size=1)
    args["grad_accumulation_steps"] = 2
    cmd = [str(LAUNCH), "-n", "2", "--backend", "ring", "--hosts", "127.0.0.1"]
    cmd += ["-p", str(_free_base_port()), "--", sys.executable, "-m", "mlx_kto.train"]
    p = subprocess.run(cmd + _flags(args), env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout + p.stderr
    assert "data parallel: 2 ranks, global batch 4 rows" in out
    assert out.count("adapter saved") == 1  # rank 0 alone speaks and writes
    a = mx.load(str(one.adapter_path / "adapters.safetensors"))
    b = mx.load(str(two_dir / "adapters.safetensors"))
    assert max(float(mx.abs(v).max()) for k, v in a.items() if "lora_b" in k) > 1e-3
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), rtol=0, atol=2e-5)
    lines = [json.loads(x) for x in (two_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    ones = [json.loads(x) for x in one.metrics_path.read_text().splitlines()]
    # z > 0 shaped the later updates, so the comparison covers the KL point's all-reduce: step
    # 2's kl is the estimate after one update from fixed weights (measured 1.4; float noise
    # ~1e-6), so "clearly non-zero" holds on any machine, unlike a tuned trajectory bound.
    assert ones[0]["kl"] < 1e-5 and ones[1]["kl"] > 1e-3, [r["kl"] for r in ones]
    for r, o in zip(lines, ones):
        # rewards/accuracy is left out: before the first update the rewards are 0 up to float
        # noise between batch shapes, and accuracy (a strict > on ties) turns that noise into 0.5.
        for key in ("loss", "kl", "count/chosen", "grad_norm", "tokens"):
            # abs: z is a mean of differences of sequence log-probs (~-100 each), clamped at
            # 0; float32 noise between batch shapes reaches ~1e-6 there.
            assert r[key] == pytest.approx(o[key], rel=1e-4, abs=1e-5), key
    ckpt = json.loads((list_checkpoints(two_dir)[-1] / "trainer_state.json").read_text())
    assert ckpt["world_size"] == 2 and ckpt["global_batch"] == 4


def _start_ranks(args: dict, log_dir: Path, tag: str, rank1: dict | None = None):
    """Both ranks as mlx.launch starts local ones (MLX_RANK + an MLX_HOSTFILE), by hand, so
    the test holds each rank's pid. `rank1`: flags that rank 1 alone gets (another host's
    copy of the data, say)."""
    base = _free_base_port()
    hostfile = log_dir / f"hosts_{tag}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    procs = []
    for rank in range(2):
        env = _env() | {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        out = open(log_dir / f"{tag}_{rank}.log", "w")
        flags = {**args, **(rank1 or {})} if rank == 1 else args
        cmd = [sys.executable, "-m", "mlx_kto.train", *_flags(flags)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _wait_for_checkpoint(run_dir: Path, after: int, procs, timeout=180) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        steps = [int(c.name.split("_")[1]) for c in list_checkpoints(run_dir)]
        if steps and max(steps) > after:
            return max(steps)
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    for p in procs:
        p.kill()
    raise AssertionError("no new checkpoint")


def _finish(p, timeout=60) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("a rank hung after its peer went away") from None


def test_killed_rank_ends_run_checkpoint_resumes_hung_rank_times_out(tiny_llama, data, tmp_path):
    run = tmp_path / "run"
    args = _args(str(tiny_llama), str(data), str(run), batch_size=2, iters=5000)
    args |= {"steps_per_save": 2, "keep_checkpoints": 2, "distributed_timeout": 4}

    # 1. kill -9 of rank 1: rank 0 stops within seconds, with one line naming the resume.
    procs = _start_ranks(args, tmp_path, "a")
    _wait_for_checkpoint(run, 0, procs)
    procs[1].send_signal(signal.SIGKILL)
    assert _finish(procs[0]) == 2
    procs[1].wait()
    last = (tmp_path / "a_0.log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: distributed: rank 0 lost the connection to another rank")
    assert f"--resume {run}" in last
    k = int(list_checkpoints(run)[-1].name.split("_")[1])

    # 2. Resuming with another world size is refused in one line.
    with pytest.raises(UserError, match="2 rank\\(s\\); this run has 1"):
        train(make_config(None, **{**args, "resume": str(run)}), log=lambda *_: None)

    # 3. The same two ranks resume from the last checkpoint and go on.
    procs = _start_ranks({**args, "resume": str(run)}, tmp_path, "b")
    _wait_for_checkpoint(run, k, procs)
    # 4. A rank that hangs (SIGSTOP: its socket stays open) trips rank 0's watchdog.
    procs[1].send_signal(signal.SIGSTOP)
    assert _finish(procs[0]) == 3
    procs[1].kill()
    procs[1].wait()
    log_b = (tmp_path / "b_0.log").read_text()
    assert f"resumed from {run / 'checkpoints' / f'step_{k:07d}'} at step {k}" in log_b
    assert "rank 0 waited more than 4s for the other ranks" in log_b.strip().splitlines()[-1]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > k


def test_ranks_given_other_data_or_settings_stop_with_one_line(tiny_llama, data, tmp_path):
    """Each rank reads its shard of one data order: another copy of the data on one host
    (other rows, even as many) or other flags would train on a mix without a word. Both
    ranks stop before the first step with the same line."""
    other = tmp_path / "other.jsonl"
    write_feedback(other, 48, seed=7, numbered=True)  # as many rows, other content
    assert other.read_text() != data.read_text()
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(data.read_text().splitlines(keepends=True)[:40]))
    cases = [
        ({"data": str(other)}, "different training data (rank 0: 48 rows, rank 1: 48 rows"),
        ({"data": str(fewer)}, "different training data (rank 0: 48 rows, rank 1: 40 rows"),
        ({"beta": 0.3}, "rank 1 was started with other training settings than rank 0"),
    ]
    for i, (rank1, needle) in enumerate(cases):
        run = tmp_path / f"run{i}"
        procs = _start_ranks(_args(str(tiny_llama), str(data), str(run)), tmp_path, f"c{i}", rank1)
        for p in procs:
            assert _finish(p, timeout=180) == 2
        for rank in range(2):
            lines = (tmp_path / f"c{i}_{rank}.log").read_text().strip().splitlines()
            errors = [x for x in lines if x.startswith("error:")]
            assert len(errors) == 1 and needle in errors[0], lines[-5:]
            assert "Traceback" not in "\n".join(lines)
        assert not (run / "adapters.safetensors").exists() and not (run / "checkpoints").exists()
