"""Training: `train(config)` (setup -> loop -> finish), the step, the KTO / DPO losses, the
divergence guard, checkpoints and resume. `python -m mlx_kto.train` is `mlx-kto train`."""

from mlx_kto.train.run import train

__all__ = ["train"]
