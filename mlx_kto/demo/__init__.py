"""The embedded demo: a tiny shipped chat model learns, from thumbs-up/down
feedback, to answer politely. `mlx-kto demo` (or `mlx-kto train` with no model
and no data) runs it; see `mlx_kto.demo.run`."""

from __future__ import annotations

from mlx_kto.runtime.paths import DEMO_ASSETS

ASSETS = DEMO_ASSETS


def run_demo(cfg=None, **kwargs):
    """Train on the shipped demo model and feedback, then print the before/after
    table (see `mlx_kto.demo.run.run_demo`)."""
    from mlx_kto.demo.run import run_demo as _run

    return _run(cfg, **kwargs)


__all__ = ["ASSETS", "run_demo"]
