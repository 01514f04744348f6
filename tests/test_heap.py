"""_heap: MLX's CPU buffer cache is off inside the fast paths while glibc keeps freed blocks,
restored after; `release` hands the kept memory back to the system; a training run calls it
once training is over."""

import sys
from pathlib import Path

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.runtime import heap as _heap
from mlx_kto.train.loop import fast_paths

import mlx.core as mx
import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _churn(n: int = 8, mb: int = 2) -> None:
    """Allocate and free n float32 arrays of `mb` MB each (below glibc's mmap threshold)."""
    xs = [mx.full((mb << 18,), float(i)) for i in range(n)]  # n x [mb MB / 4 bytes]
    mx.eval(xs)
    del xs


@linux
def test_mlx_cache_is_off_inside_fast_paths_and_restored(lora_model):
    model, _ = lora_model
    assert _heap.tuned and mx.default_device() == mx.cpu
    mx.clear_cache()
    with fast_paths(model):
        _churn()
        assert mx.get_cache_memory() == 0  # freed straight back to glibc
    _churn()
    assert mx.get_cache_memory() > 0  # MLX's own cache works again outside
    mx.clear_cache()


@linux
def test_release_hands_the_kept_heap_back(lora_model):
    """glibc keeps freed blocks (trim threshold 2 GiB): resident memory stays up after the
    arrays are gone, until `release`."""
    model, _ = lora_model
    with fast_paths(model):
        _heap.release()  # start from a trimmed heap: the churn below must fault pages in
        base = _rss_mb()
        _churn(n=64)  # 128 MB through malloc, then freed
        kept = _rss_mb()
        assert kept - base > 100, (base, kept)
        assert _heap.release()
        after = _rss_mb()
    assert kept - after > 100, (kept, after)


def test_training_releases_memory_once_training_is_over(tiny_llama, tmp_path, monkeypatch):
    from mlx_kto.config.core import make_config
    from mlx_kto.train import run as train_mod

    sys.path.insert(0, str(Path(__file__).parent))
    from feedback_fixtures import write_feedback

    write_feedback(tmp_path / "train.jsonl", 16, seed=0)

    steps_done = []
    real = _heap.release

    def release():
        steps_done.append(sum(1 for _ in open(tmp_path / "run" / "metrics.jsonl")))
        return real()

    monkeypatch.setattr(train_mod._heap, "release", release)
    cfg = make_config(
        None, model=str(tiny_llama), data=str(tmp_path), adapter_path=str(tmp_path / "run"),
        iters=2, batch_size=4, lora_rank=4, max_length=64, steps_per_eval=0, quiet=True, seed=0,
    )  # fmt: skip
    result = train_mod.train(cfg, log=lambda *_: None)
    assert result.steps == 2
    assert steps_done == [2]  # once, after the last step
