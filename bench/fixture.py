"""The benchmark model and rows, built in-process, deterministic, offline.

Model: random-init Llama in HF format, hidden 512, 8 layers, intermediate 1408,
8 heads, 4 KV heads, vocab 8000, untied embeddings, float32. Rows: ~64 prompt +
~128 completion tokens of random ids, balanced labels, fixed KL partners.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.data.tokenize import Row, assign_kl_partners

# The toy-model builder is a test helper (tests/toy.py), shared with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from toy import build_model  # noqa: E402

BENCH_SHAPE = dict(
    hidden_size=512,
    num_hidden_layers=8,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=8000,
    tie_word_embeddings=False,
)
MAX_LENGTH = 256


def bench_model(root: str | Path | None = None) -> Path:
    """Build (once, cached under root) the benchmark model folder."""
    root = Path(root or os.environ.get("MLX_KTO_BENCH_DIR", "/tmp/mlx_kto_bench"))
    path = root / "llama-512x8"
    if not (path / "model.safetensors").exists():
        build_model(path, family="llama", seed=0, init_std=0.02, **BENCH_SHAPE)
    return path


def bench_rows(n: int = 256, seed: int = 0, vocab: int = 8000, bos: int = 1) -> list[Row]:
    """n rows of ~64 prompt and ~128 completion tokens (random ids), half desirable."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = rng.randint(56, 72)
        c = rng.randint(112, 144)
        prompt = [bos] + [rng.randrange(3, vocab) for _ in range(p - 1)]
        completion = [rng.randrange(3, vocab) for _ in range(c)]
        rows.append(Row(prompt, completion, label=i % 2 == 0, where=f"bench[{i}]"))
    assign_kl_partners(rows, seed=seed, max_length=MAX_LENGTH)
    return rows
