"""Files come out with the user's umask, and interrupted atomic writes leave no strays."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import (
    atomic_write_bytes,
    atomic_write_with,
    clean_stale_temps,
    temp_path,
)

import pytest


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _expect(p: Path, mask: int) -> None:
    want = (0o777 if p.is_dir() else 0o666) & ~mask
    assert _mode(p) == want, f"{p}: {oct(_mode(p))} != {oct(want)}"


def test_training_outputs_follow_umask(umask, feedback_file, quick_config, tmp_path):
    from mlx_kto.train.run import train

    out = tmp_path / "run"
    # A checkpoint half-written by a killed run (its pid is gone) is removed by the next save.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = out / "checkpoints" / f".step_0000001.tmp-{dead}-0badc0de"
    stale.mkdir(parents=True)
    (stale / "adapters.safetensors").write_bytes(b"half")
    train(quick_config(feedback_file, out, iters=2, steps_per_save=1), log=lambda *_: None)
    files = [out / "adapters.safetensors", out / "adapter_config.json", out / "kto_config.json"]
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step_0000001", "step_0000002"]
    for p in [*files, *ckpts, *ckpts[-1].iterdir()]:
        _expect(p, umask)


def test_plot_and_converters_follow_umask(umask, tiny_llama, tmp_path):
    from mlx_kto.demo.plot import plot_metrics
    from mlx_kto.export.fuse import fuse
    from mlx_kto.export.gguf_lora import to_gguf
    from mlx_kto.export.peft import to_peft

    from adapter_fixtures import make_adapter

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"step": i, "loss": 1.0 / i, "kl": 0.1}) + "\n" for i in range(1, 5))
    )
    png = plot_metrics(metrics, tmp_path / "training.png")
    _expect(png, umask)
    adapter, _ = make_adapter(tiny_llama, tmp_path / "adapter")
    fused = fuse(adapter, tmp_path / "fused", base=str(tiny_llama))
    for p in [fused, *fused.iterdir()]:
        _expect(p, umask)
    _expect(to_gguf(adapter, tmp_path / "a.gguf", base=str(tiny_llama)), umask)
    peft = to_peft(adapter, tmp_path / "peft")
    for p in peft.iterdir():
        _expect(p, umask)
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "adapters.safetensors"
    target.write_bytes(b"old")

    def half(p: Path) -> None:
        p.write_bytes(b"new, half")
        raise KeyboardInterrupt  # an interrupt mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(target, half)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors"]

    def full(p: Path) -> None:
        p.write_bytes(b"new")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="adapters.safetensors: cannot write .No space left"):
        atomic_write_with(target, full)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters.safetensors"]


def test_stale_temps_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "adapter_config.json"
    # A process killed mid-write (SIGKILL: no cleanup) leaves its temp file behind.
    code = (
        "import os, sys; from pathlib import Path; from mlx_kto.runtime.atomic import temp_path; "
        f"p = temp_path(Path({str(target)!r})); p.write_bytes(b'half'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    (tmp_path / "mine").mkdir()
    alive = temp_path(target)  # this process's own temp file: never removed under it
    alive.write_bytes(b"in progress")
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".adapter_config.json.tmp-")]
    assert len(stale) == 2
    atomic_write_bytes(target, b"{}\n")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([alive.name, "adapter_config.json", "mine"])
    assert clean_stale_temps(target) == 0
