"""What a training run works on: `Run` (built by setup.py, stepped by loop.py, finished by
run.py), its position `TrainState`, the caller's `Extras`, and the checkpoint of a run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.reference.scorer import ReferenceScorer
from mlx_kto.train.callbacks import CallbackList
from mlx_kto.train.checkpoint import save_checkpoint
from mlx_kto.train.distributed import Dist
from mlx_kto.train.guard import RunGuard
from mlx_kto.train.step import global_batch_size

import mlx.nn as nn
import mlx.optimizers as optim


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: next micro-batch to read
    batch: int = 0
    trained_tokens: int = 0
    history: list = field(default_factory=list)  # last eval metrics etc.
    meta: dict = field(default_factory=dict)  # stored in checkpoints (data hash: resume.py)


@dataclass
class Extras:
    """What the caller adds around training (train/ imports nothing from judge/).

    probe: `(cfg, model, tokenizer, rows, frozen, log) -> probe | None`, a diversity probe
        called as `probe(step, record, n_steps)` (judge.probes.make_probe).
    plot: `(run_dir, log) -> Path | None`, called once after the adapter is saved
        (judge.plot.plot_after_training)."""

    probe: Callable | None = None
    plot: Callable | None = None


@dataclass
class Run:
    """One training run: what the loop steps and what the finish saves. Only rank 0
    (`dist.is_main`) writes metrics, checkpoints and the adapter."""

    cfg: KTOConfig  # the run's own config (a copy: the caller's is never changed)
    model: nn.Module  # base + LoRA, the LoRA trainable
    optimizer: optim.Optimizer
    train_rows: list  # tokenized rows (data.tokenize.Row), KL partners assigned for kto
    scorer: ReferenceScorer  # reference log-probs (adapter bypassed, or the frozen start)
    run_dir: Path
    adapter_config: dict  # adapter_config.json as written with every save
    n_steps: int  # optimizer steps of the whole run
    valid_rows: list | None = None
    desirable_weight: float = 1.0  # `auto` resolved
    pad_id: int = 0
    state: TrainState = field(default_factory=TrainState)
    dist: Dist = field(default_factory=Dist)
    log: Callable[[str], None] = print
    callbacks: CallbackList = field(default_factory=CallbackList)
    guard: RunGuard | None = None  # non-finite steps and stop signals (made by the loop if None)
    probe: Callable | None = None  # `probe(step, record, n_steps)`: diversity figures

    def __post_init__(self):
        if self.guard is None:
            self.guard = RunGuard(self.cfg, self.run_dir, self.log)


def checkpoint_state(run: Run) -> dict:
    """trainer_state.json of the run's last completed step (besides "step")."""
    state, world = run.state, run.dist.size
    return {
        "epoch": state.epoch,
        "batch": state.batch,  # next global batch (micro-batch x accumulation x ranks rows)
        "trained_tokens": state.trained_tokens,
        "seed": run.cfg.seed,
        "world_size": world,
        "global_batch": global_batch_size(run.cfg, world),
        "config": run.cfg.to_dict(),
        **state.meta,
    }


def save_run_checkpoint(run: Run) -> Path:
    """Checkpoint the last completed step (pruned to cfg.keep_checkpoints)."""
    return save_checkpoint(
        run.run_dir,
        run.state.step,
        run.model,
        run.optimizer,
        checkpoint_state(run),
        run.adapter_config,
        keep=run.cfg.keep_checkpoints,
    )
