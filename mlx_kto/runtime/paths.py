"""Where mlx-kto keeps things on disk: the user's cache folder and the shipped demo assets."""

from __future__ import annotations

import os
from pathlib import Path

from mlx_kto.runtime.switches import CACHE_DIR

# The embedded demo (model, feedback, held-out prompts), shipped as package data.
DEMO_ASSETS = Path(__file__).resolve().parents[1] / "demo" / "assets"


def default_cache_dir() -> Path:
    """$MLX_KTO_CACHE_DIR if set (the cache folder itself), else
    $XDG_CACHE_HOME/mlx_kto/reference, else ~/.cache/mlx_kto/reference."""
    env = CACHE_DIR.raw()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlx_kto" / "reference"
