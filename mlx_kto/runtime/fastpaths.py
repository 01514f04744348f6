"""The CPU backend's fast paths as one context: row streams, arithmetic exp, heap settings.

Training, evaluation and reference passes all run inside `fast_paths(model)`, so the policy
and its reference compute the same way. Each part can be switched off on its own
(runtime/switches.py); on a GPU the context changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from mlx_kto.runtime import fastops, heap, traces
from mlx_kto.runtime.qmatmul import dequantizes_per_call
from mlx_kto.runtime.streams import cpu_row_parallel
from mlx_kto.runtime.switches import CPU_STREAMS, FAST_EXP

import mlx.nn as nn


@contextmanager
def fast_paths(
    model: nn.Module,
    streams: int | None = None,
    fast_exp: bool | None = None,
    traces_mb: int | None = None,
) -> Iterator[None]:
    """The CPU backend's fast paths, for everything run inside (a no-op on a GPU, and when
    already inside): every log-prob pass spreads its rows over one stream per core
    (`cpu_row_parallel`), and on x86 the model's attention and SwiGLU use fastops'
    arithmetic exp (`fastops.fast_ops`). `streams` overrides the number of row streams
    (1 = rows one after another), `fast_exp` the arithmetic exp (False = MLX's own ops),
    `traces_mb` the compiled traces kept per function (runtime/traces.py `scoped`).
    MLX's CPU buffer cache is off inside while glibc keeps freed blocks
    (`heap.mlx_cache_off`), restored on exit.

    A quantized model on the CPU (`qmatmul.dequantizes_per_call`) runs its rows on one stream
    unless $MLX_KTO_CPU_STREAMS says otherwise: each stream would dequantize every weight for
    its own rows, twice the dequantization work and twice the dequantized weights alive until
    the backward (SmolLM2 Q4_1, bench/real_model.py: warm step 7.99 s / 3.06 GB on two streams,
    6.96 s / 1.66 GB on one)."""
    if streams is None and not CPU_STREAMS.is_set():
        streams = 1 if dequantizes_per_call(model) else None
    cache = heap.mlx_cache_off()  # glibc keeps freed blocks already (heap.py)
    budget = traces.scoped(traces_mb) if traces_mb is not None else nullcontext()
    try:
        with cpu_row_parallel(streams), fastops.fast_ops(model, fast_exp), budget:
            yield
    finally:
        heap.mlx_cache_restore(cache)


CHECKPOINT_TRACES_MB = 32  # per compiled function under --grad-checkpoint (128 otherwise)


def checkpoint_paths(cfg) -> dict:
    """`fast_paths` options for a run with gradient checkpointing: one row stream and MLX's
    own attention / SwiGLU, unless $MLX_KTO_CPU_STREAMS / $MLX_KTO_FAST_EXP say otherwise,
    and CHECKPOINT_TRACES_MB of compiled traces per function. A user who asks for
    checkpointing wants the memory: on the 8 longest real_h2h rows (SmolLM2, --pass-tokens
    1024) the fast paths add ~120 MB of resident memory (1.58 vs 1.46 GB) for the same MLX
    peak, and make the forward-only passes ~1.7x faster; 16 MB of traces instead of 128 took
    ~80 MB off that one step and ~150 MB off 3 steps of 24 rows (bench/RESULTS.md)."""
    if not getattr(cfg, "grad_checkpoint", False):
        return {}
    out: dict = {"traces_mb": CHECKPOINT_TRACES_MB}
    if not CPU_STREAMS.is_set():
        out["streams"] = 1
    if FAST_EXP.flag() is None:
        out["fast_exp"] = False
    return out
