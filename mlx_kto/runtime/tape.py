"""How wide MLX lays out an evaluation's tape: wide enough that the row streams interleave.

`mx.eval` orders the graph breadth-first from its outputs, but goes depth-first once the
frontier holds more than $MLX_BFS_MAX_WIDTH arrays (MLX's default: 20). A gradient pass on
two row streams (runtime/streams.py) ends in ~2 x 420 LoRA gradients, so with the default the
tape holds one stream's forward and backward ahead of the other's. The main thread runs at
most ~100 ops ahead of the streams, so the second stream idled for most of the first's work:
gradient passes of real SmolLM2 rows ran at 1.35-1.44 cores, KL forwards (one output) at 1.9.
A width of 8192 keeps the streams' ops interleaved: 1.8-1.9 cores and 15-30% shorter
gradient passes, with the same MLX peak and RSS (bench/RESULTS.md).

A wide tape also runs every checkpointed block's recomputation early, which undoes
--grad-checkpoint (one pass of 512-token rows: MLX peak 0.070 GB narrow, 0.119 GB wide, 0.114
without checkpointing), and a checkpointed run uses one row stream anyway: such a run keeps
MLX's width. MLX reads the variable once, at the process's first evaluation: a training run
sets it before its model loads (train/setup.py `begin`), evaluates once, and puts the
environment back, so that no process it starts (a checkpointed run among them) inherits the
width. In a process that has evaluated something already it changes nothing.
"""

from __future__ import annotations

import os
import platform

from mlx_kto.runtime.switches import TAPE_WIDTH

import mlx.core as mx

MLX_VAR = "MLX_BFS_MAX_WIDTH"
WIDTH = 8192  # above the ~850 gradient leaves of a two-stream pass on a 30-layer model


def width_for(grad_checkpoint: bool = False) -> str | None:
    """The width a run sets: $MLX_KTO_TAPE_WIDTH, else 8192 on Linux (where the CPU row
    streams run) for a run without checkpointing; None where the user set $MLX_BFS_MAX_WIDTH
    or MLX's default stays."""
    if TAPE_WIDTH.is_set():
        return str(int(TAPE_WIDTH.raw()))
    if os.environ.get(MLX_VAR) or grad_checkpoint or platform.system() != "Linux":
        return None
    return str(WIDTH)


def widen(grad_checkpoint: bool = False) -> str | None:
    """Give this process's MLX the width `width_for` says (read at its first evaluation, which
    this makes), leaving the environment as it was. Returns the width set, or None."""
    width = width_for(grad_checkpoint)
    if width is None:
        return None
    prev = os.environ.get(MLX_VAR)
    os.environ[MLX_VAR] = width
    try:
        mx.eval(mx.array(0) + 1)  # an op to evaluate: MLX reads the variable here, once
    finally:
        if prev is None:
            os.environ.pop(MLX_VAR, None)
        else:
            os.environ[MLX_VAR] = prev
    return width
