"""Keep torch out of mlx-kto's command processes.

mlx-lm reads tokenizers through transformers, and transformers imports torch at import time
whenever it is installed (transformers/configuration_utils.py and friends): ~180 MB resident
and 1.5-3 s of startup in a venv that has torch, for nothing, since mlx-kto computes with MLX
alone (bench/RESULTS.md, issue 15). The `mlx-kto` and `python -m mlx_kto.train` processes mark
torch absent before anything imports transformers (`importlib.util.find_spec("torch")` is None,
so transformers takes its torch-less paths; GGUF tokenizers are built from the file's metadata
without transformers' torch-bound GGUF reader, model/gguf_tokenizer.py). The TensorBoard
writer's torch fallback lifts the mark (`allow`). `import mlx_kto` in a user's own
program changes nothing; $MLX_KTO_ALLOW_TORCH=1 turns this off.
"""

from __future__ import annotations

import os
import sys

_kept_out = False


def keep_out() -> bool:
    """Mark torch absent in this process (a command's entry point calls this first); False
    when torch or transformers is imported already or $MLX_KTO_ALLOW_TORCH=1."""
    global _kept_out
    if os.environ.get("MLX_KTO_ALLOW_TORCH") == "1":
        return False
    if "torch" in sys.modules or "transformers" in sys.modules:
        return kept_out()
    sys.modules["torch"] = None  # `import torch` raises ImportError, find_spec gives None
    _kept_out = True
    return True


def kept_out() -> bool:
    """True while `keep_out` is in effect."""
    return _kept_out and "torch" in sys.modules and sys.modules["torch"] is None


def allow() -> None:
    """Lift the mark, for code that imports torch itself (not through transformers)."""
    global _kept_out
    if kept_out():
        del sys.modules["torch"]
    _kept_out = False
