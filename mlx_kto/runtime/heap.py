"""Keep freed memory in the process on Linux (glibc), so MLX's CPU arrays reuse warm pages.

MLX's CPU backend allocates every intermediate array with malloc and frees it when done; glibc
serves blocks over 128 KiB-32 MiB (its dynamic mmap threshold) with a fresh mmap and returns
them on free, so each step's activations fault their pages in again. On the dev VM a first
touch costs ~0.7 ns/byte: copying into fresh memory runs at 1.4 GB/s, into reused memory at
28 GB/s, and an elementwise op on a 37 MB array is 4x slower fresh (bench/RESULTS.md).

Raising the mmap threshold to glibc's maximum (32 MiB) and the trim threshold to 2 GiB keeps
freed blocks in the heap for the next step, as MLX's own buffer cache does on Metal and CUDA.
The cost is that the process keeps its high-water mark of heap memory until it exits.
$MLX_KTO_MALLOC_TUNE=0 switches this off.

With glibc keeping that reserve, MLX's own CPU buffer cache on top of it only holds a second
one (~30 MB on the bench step, no faster: bench/RESULTS.md), so the CPU fast paths turn it off
(`mlx_cache_off`), and a finished run hands the whole reserve back (`release`) before it saves,
evaluates and plots: the process's peak resident size is then the training's own.
"""

from __future__ import annotations

import ctypes
import platform

from mlx_kto.runtime.switches import MALLOC_TUNE

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit (4 MiB * sizeof(long))
TRIM_THRESHOLD = (1 << 31) - 1
DEFAULTS = {M_MMAP_THRESHOLD: 128 << 10, M_TRIM_THRESHOLD: 128 << 10}

tuned = False


def _libc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def tune() -> bool:
    """Set the thresholds (once per process); True when in effect."""
    global tuned
    if tuned or MALLOC_TUNE.flag() is False:
        return tuned
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    tuned = ok
    return tuned


def mlx_cache_off() -> int | None:
    """Set MLX's buffer-cache limit to 0 while glibc keeps freed blocks (`tune`); returns the
    previous limit for `mlx_cache_restore`, or None when nothing was changed."""
    if not tuned:
        return None
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return None
    return mx.set_cache_limit(0)


def mlx_cache_restore(prev: int | None) -> None:
    """Undo `mlx_cache_off` (a user's `cache_limit_mb` comes back with it)."""
    if prev is not None:
        import mlx.core as mx

        mx.set_cache_limit(prev)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


def mallinfo() -> _MallInfo2 | None:
    """glibc's mallinfo2 (all arenas), or None where it cannot be read (not glibc, glibc
    before 2.33)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def in_use() -> int | None:
    """Bytes of heap in use (mmapped blocks included), or None (`mallinfo`)."""
    m = mallinfo()
    return None if m is None else int(m.uordblks + m.hblkhd)


def release() -> bool:
    """Hand freed memory back to the system: MLX's buffer cache, then every free page of
    glibc's heap (malloc_trim). For the end of a run; True when glibc trimmed."""
    import mlx.core as mx

    mx.clear_cache()
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def untune() -> None:
    """Fixed thresholds at glibc's initial defaults (glibc's dynamic adjustment stays off once
    set; a true baseline is a process started with $MLX_KTO_MALLOC_TUNE=0)."""
    global tuned
    libc = _libc()
    if libc is not None:
        for param, value in DEFAULTS.items():
            libc.mallopt(param, value)
    tuned = False
