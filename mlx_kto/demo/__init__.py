"""The embedded demo: a tiny shipped chat model learns, from thumbs-up/down
feedback, to answer politely. `mlx-kto demo` (or `mlx-kto train` with no model
and no data) runs it: `run_demo` (mlx_kto.demo.run) trains on the shipped model and
feedback, then prints the before/after table."""

from __future__ import annotations

from mlx_kto.demo.run import run_demo
from mlx_kto.runtime.paths import DEMO_ASSETS

ASSETS = DEMO_ASSETS

__all__ = ["ASSETS", "run_demo"]
