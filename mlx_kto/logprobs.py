"""Sequence log-probabilities under their documented name; they live in `mlx_kto.model.logprobs`."""

from mlx_kto.model.logprobs import *  # noqa: F403
