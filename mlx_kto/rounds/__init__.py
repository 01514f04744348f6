"""Tuning rounds without a person in every loop: sample the policy, label its replies with
a rule or a local judge model, train a KTO round from the previous round's adapter,
measure on held-out prompts, repeat (`mlx-kto rounds`; `run_rounds` from Python)."""

from __future__ import annotations

from mlx_kto.rounds.config import RoundsConfig, rounds_config
from mlx_kto.rounds.loop import run_rounds

__all__ = ["RoundsConfig", "rounds_config", "run_rounds"]
