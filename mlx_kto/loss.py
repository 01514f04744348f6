"""The KTO / DPO losses under their documented name; they live in `mlx_kto.train.loss`."""

from mlx_kto.train.loss import *  # noqa: F403
