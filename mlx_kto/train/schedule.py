"""How long a run is and how fast it learns: the number of optimizer steps and the learning
rate schedule (linear warmup, then cosine / linear decay or constant, as mlx-lm and TRL)."""

from __future__ import annotations

import math

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import num_batches
from mlx_kto.train.dpo import is_paired, pair_batches_per_epoch
from mlx_kto.train.step import global_batch_size

import mlx.core as mx
import mlx.optimizers as optim


def make_schedule(cfg: KTOConfig, total_steps: int):
    """Linear warmup from 0, then cosine/linear decay to 0 or constant."""
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    )
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, 0.0)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, decay_steps)
    else:
        main = lambda _: mx.array(lr, dtype=mx.float32)  # noqa: E731  (AdamW needs an array)
    if warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def total_steps(cfg: KTOConfig, n_train_rows: int, world_size: int = 1, rows=None) -> int:
    """Optimizer steps: one per global batch (micro-batch x accumulation x ranks rows; pairs
    for dpo/ipo, which need the tokenized `rows` to count them)."""
    if cfg.iters:
        return cfg.iters
    return max(1, math.ceil(batches_per_epoch(cfg, n_train_rows, world_size, rows) * cfg.epochs))


def batches_per_epoch(cfg: KTOConfig, n_train_rows: int, world_size: int, rows=None) -> int:
    """Global batches in one pass over the training rows (pairs for dpo/ipo)."""
    size = global_batch_size(cfg, world_size)
    if is_paired(cfg):
        if rows is None:
            raise ValueError("dpo/ipo: batches_per_epoch needs the rows to count pairs")
        return pair_batches_per_epoch(rows, size)
    return num_batches(n_train_rows, size, min_batch(cfg))


def min_batch(cfg: KTOConfig) -> int:
    """The smallest micro-batch: KTO's KL estimate needs 2 rows; other losses 1."""
    return 2 if cfg.loss_type == "kto" else 1
