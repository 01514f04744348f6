"""A micro-batch's rows in parallel on CPU streams, one per core.

MLX's CPU backend runs each stream's ops on one thread and only its matmuls (BLAS) use more
cores; elementwise ops (softmax, silu, masking) dominate a small model's step and run on one
core. Spreading a batch's rows over one stream per core, each with single-threaded BLAS, puts
every core to work on every op (and backward ops stay on their forward's stream). Rows are
independent in a log-prob pass, so the results are the same rows computed the same way.

`cpu_row_parallel` opens the streams; the log-prob passes (model/logprobs.py) ask
`row_groups` how to cut their rows and run each group under `mx.stream` (`map_row_groups`).
$MLX_KTO_CPU_STREAMS overrides the count (runtime/switches.py).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mlx_kto.runtime import blas
from mlx_kto.runtime.switches import CPU_STREAMS

import mlx.core as mx

_STREAMS: list = []  # CPU streams of the current `cpu_row_parallel` context (empty: off)
_THREAD_STREAMS: dict[int, list] = {}  # streams made per thread (MLX never frees a stream)


def row_groups(B: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per stream (a single range when parallelism is off)."""
    n = min(len(_STREAMS), B)
    if n < 2 or mx.default_device() != mx.cpu:
        return [(0, B)]
    bounds = [round(i * B / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def map_row_groups(fn: Callable[..., mx.array], *arrays: mx.array) -> mx.array:
    """fn over each stream's rows of `arrays` (all [B, ...]), run on that stream, concatenated
    along axis 0; fn(*arrays) on the current stream when the rows stay together."""
    groups = row_groups(arrays[0].shape[0])
    if len(groups) < 2:
        return fn(*arrays)
    parts = []
    for stream, (a, b) in zip(_STREAMS, groups):
        with mx.stream(stream):
            parts.append(fn(*(x[a:b] for x in arrays)))
    return mx.concatenate(parts, axis=0)


def blas_threads(n: int | None) -> int | None:
    """Set OpenBLAS's thread count (when mlx_kto preloaded OpenBLAS); returns the previous."""
    if not blas.loaded:
        return None
    try:
        lib = ctypes.CDLL(blas.loaded)
        prev = lib.openblas_get_num_threads()
        if n is not None:
            lib.openblas_set_num_threads(int(n))
        return prev
    except (OSError, AttributeError):
        return None


def active_streams() -> int:
    """CPU streams the current `cpu_row_parallel` context spreads rows over (0: none)."""
    return len(_STREAMS)


def default_streams() -> int:
    """Streams `cpu_row_parallel` uses by default: one per core on the CPU backend (at most 8;
    $MLX_KTO_CPU_STREAMS overrides, 1 = off), else 1 (a GPU runs rows in parallel already)."""
    env = CPU_STREAMS.raw()
    if env:
        return max(1, int(env))
    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def cpu_row_parallel(n: int | None = None) -> Iterator[int]:
    """Within the context, every `token_logps` / `sequence_logps` call (policy, KL and reference
    forwards, their backward passes, compiled or not) spreads its rows over `n` CPU streams
    (default `default_streams()`), and OpenBLAS runs single-threaded per stream; both are
    restored on exit. Results are the same rows, computed the same way (per-row independent).
    Streams belong to the calling thread. Yields the number of streams in use."""
    global _STREAMS
    n = default_streams() if n is None else n
    if n < 2 or mx.default_device() != mx.cpu or _STREAMS:
        yield max(len(_STREAMS), 1)
        return
    prev = blas_threads(max(1, (os.cpu_count() or n) // n))
    made = _THREAD_STREAMS.setdefault(threading.get_ident(), [])
    made += [mx.new_stream(mx.cpu) for _ in range(n - 1 - len(made))]
    _STREAMS = [mx.default_stream(mx.cpu)] + made[: n - 1]
    try:
        yield n
    finally:
        _STREAMS = []
        if prev is not None:
            blas_threads(prev)


def row_streams() -> list:
    """The streams of the current `cpu_row_parallel` context (empty: off)."""
    return list(_STREAMS)


@contextmanager
def rows_unsplit() -> Iterator[None]:
    """Within the context, log-prob passes keep their rows on the current stream (for a
    caller that spreads row groups over the streams itself: the trainer's grouped step)."""
    global _STREAMS
    saved, _STREAMS = _STREAMS, []
    try:
        yield
    finally:
        _STREAMS = saved
