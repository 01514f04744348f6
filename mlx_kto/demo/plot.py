"""The demo's training plot: the same code as every run's `training.png` (mlx_kto.judge.plot)."""

from __future__ import annotations

from mlx_kto.judge.plot import PANELS, plot_metrics, read_metrics, series, smooth

__all__ = ["PANELS", "plot_metrics", "read_metrics", "series", "smooth"]
