"""Load the system OpenBLAS before MLX on Linux CPU.

The `mlx[cpu]` wheel bundles a slow reference BLAS; MLX resolves BLAS symbols at
load time, so a system OpenBLAS loaded RTLD_GLOBAL first is used instead (~40x
faster matmuls). This module must run before `mlx.core` is first imported.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import subprocess
import sys

from mlx_kto.runtime.switches import NO_OPENBLAS, OPENBLAS, QUIET

_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]

loaded: str | None = None


def _ldconfig_paths() -> list[str]:
    """OpenBLAS entries of the dynamic linker's cache (`ldconfig -p`), best first.

    The linker cache is what `dlopen` itself consults, and reading it never walks the
    filesystem (a recursive glob once followed the symlink loop in Debian's llvm-14 build
    folder forever).
    """
    for exe in ("/sbin/ldconfig", "/usr/sbin/ldconfig", "ldconfig"):
        try:
            out = subprocess.run(
                [exe, "-p"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        hits = re.findall(r"^\s*(libopenblas\S*\.so\S*)\s.*=>\s*(\S+)\s*$", out, re.M)
        # Prefer the pthread build, then the plain soname .so.0.
        hits.sort(key=lambda h: ("pthread" not in h[1], h[0] != "libopenblas.so.0", h[1]))
        return [path for _, path in hits]
    return []


def find_openblas() -> str | None:
    """Return the path of a system OpenBLAS shared library, or None.

    Order: $MLX_KTO_OPENBLAS, the known Debian/Fedora paths, then the linker cache.
    """
    env = OPENBLAS.raw()
    if env:
        return env if os.path.exists(env) else None
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    for path in _ldconfig_paths():
        if os.path.exists(path):
            return path
    return None


def preload() -> str | None:
    """Load OpenBLAS globally on Linux if present; warn once (quietly) if not."""
    global loaded
    if loaded or platform.system() != "Linux" or NO_OPENBLAS.is_set():
        return loaded
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS. Nothing to do but stay silent.
        return None
    path = find_openblas()
    if path is None:
        if not QUIET.is_set():
            print(
                "mlx_kto: system OpenBLAS not found; MLX on CPU will be slow. "
                "Install it with `apt-get install libopenblas0-pthread`.",
                file=sys.stderr,
            )
        return None
    try:
        ctypes.CDLL(path, mode=os.RTLD_GLOBAL)
    except OSError:
        return None
    loaded = path
    return loaded
