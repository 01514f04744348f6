"""Keep torch out of mlx-kto's own command processes.

mlx-lm loads tokenizers and configs through transformers, and transformers 5 imports torch at
import time whenever torch is installed (it has no switch to say no). mlx-kto never computes
with torch, so in a venv that also holds torch every command paid for it: +1.5 s to start and
about +240 MB resident (bench/RESULTS.md, head to head with TRL). The command entry points
(`mlx-kto ...`, `python -m mlx_kto.train`) call `block()` before anything imports mlx-lm:
`sys.modules["torch"] = None` makes `importlib.util.find_spec("torch")` answer None, so
transformers takes torch as absent, and a plain `import torch` raises ImportError. Library
use (`import mlx_kto` in a user's own program, the tests) is untouched. Code that does need
torch in a command (the tensorboard reporter's fallback) calls `allow()` first.
$MLX_KTO_ALLOW_TORCH=1 leaves torch importable.
"""

from __future__ import annotations

import os
import sys

blocked = False


def block() -> bool:
    """Make torch unimportable in this process, unless it is imported already or
    $MLX_KTO_ALLOW_TORCH=1. Returns whether it is now blocked."""
    global blocked
    if os.environ.get("MLX_KTO_ALLOW_TORCH") == "1" or sys.modules.get("torch") is not None:
        return False
    sys.modules["torch"] = None
    blocked = True
    return True


def allow() -> None:
    """Undo `block()` (before code that imports torch on purpose)."""
    global blocked
    if "torch" in sys.modules and sys.modules["torch"] is None:
        del sys.modules["torch"]
    blocked = False
