"""The CPU fast paths as a run uses them: `runtime.fastpaths` (row streams, arithmetic exp,
heap settings), off where they would undo gradient checkpointing."""

from __future__ import annotations

from contextlib import AbstractContextManager

from mlx_kto.runtime.fastpaths import checkpoint_paths, fast_paths

import mlx.nn as nn

__all__ = ["checkpoint_paths", "fast_paths", "run_fast_paths"]


def run_fast_paths(model: nn.Module, cfg) -> AbstractContextManager[None]:
    """`fast_paths(model)` as a run configured by `cfg` uses them (`checkpoint_paths`)."""
    return fast_paths(model, **checkpoint_paths(cfg))
