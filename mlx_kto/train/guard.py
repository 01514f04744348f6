"""Guards around the training loop: non-finite steps never reach the weights, and Ctrl-C /
SIGTERM stop at a step boundary with a checkpoint instead of losing the run.

- `keep_finite_update`: inside the (compiled) step, after AdamW: every trainable weight and
  every optimizer-state entry becomes `where(ok, new, old)` with one scalar
  `ok = isfinite(loss) & isfinite(grad_norm)` (the gradient norm is already computed for
  clipping, so the check costs two scalar ops and a select over the LoRA-sized state).
- `DivergenceGuard`: host side, on the loss and norm the loop evaluates anyway: logs each
  skipped step and stops the run after `max_bad_steps` in a row.
- `StopSignals`: SIGINT / SIGTERM set a flag the loop reads after each step (finish the step,
  checkpoint, exit 130 / 143); a second signal abandons the step at once (`StepSnapshot`
  gives back the weights of the last completed step).
"""

from __future__ import annotations

import math
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from mlx_kto.errors import UserError
from mlx_kto.model.load import all_finite  # noqa: F401  (re-exported: train.guard.all_finite)
from mlx_kto.train.checkpoint import list_checkpoints

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten


class Diverged(UserError):
    """Training stopped: too many non-finite steps in a row (exit 2, one line)."""


class Interrupted(Exception):
    """Training stopped by SIGINT / SIGTERM after checkpointing the last completed step."""

    def __init__(self, signum: int, step: int, run_dir, checkpoint=None):
        self.signum, self.step, self.run_dir, self.checkpoint = signum, step, run_dir, checkpoint
        self.exit_code = 128 + signum  # 130 for SIGINT, 143 for SIGTERM (shell convention)
        name = signal.Signals(signum).name
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (no step completed)"
        super().__init__(f"interrupted ({name}) after step {step}; {where}")


# -- inside the step ---------------------------------------------------------------------


def _select_into(new, old, ok: mx.array):
    """`where(ok, new, old)` leaf by leaf, writing into `new`'s dicts/lists in place (the
    compiled step captures those containers, so they must stay the same objects)."""
    if isinstance(new, dict):
        for k in new:
            if k in old:
                new[k] = _select_into(new[k], old[k], ok)
        return new
    if isinstance(new, list):
        for i in range(min(len(new), len(old))):
            new[i] = _select_into(new[i], old[i], ok)
        return new
    if isinstance(new, mx.array) and isinstance(old, mx.array):
        return mx.where(ok, new, old)
    return new


def keep_finite_update(
    model: nn.Module, optimizer: optim.Optimizer, grad, loss: mx.array, norm: mx.array
) -> mx.array:
    """`optimizer.update(model, grad)`, applied only when loss and gradient norm are finite;
    otherwise weights and optimizer state (step count included) stay as they were.
    Returns `ok` (a bool scalar)."""
    ok = mx.isfinite(loss) & mx.isfinite(norm)
    old_params = tree_map(lambda x: x, model.trainable_parameters())
    old_state = tree_map(lambda x: x, optimizer.state)
    optimizer.update(model, grad)
    new_params = model.trainable_parameters()
    model.update(_select_into(new_params, old_params, ok))
    _select_into(optimizer.state, old_state, ok)
    return ok


# -- host side ------------------------------------------------------------------------------


class DivergenceGuard:
    """Counts optimizer steps whose update was skipped (non-finite loss or gradient norm)
    and raises `Diverged` after `max_bad` in a row."""

    def __init__(self, cfg, log=print):
        self.cfg = cfg
        self.max_bad = getattr(cfg, "max_bad_steps", 3)
        self.log = log
        self.in_a_row = 0
        self.total = 0

    def check(self, step: int, loss: float, norm: float, last_saved=None) -> bool:
        """True when `step`'s update was skipped (same rule as `keep_finite_update`)."""
        if math.isfinite(loss) and math.isfinite(norm):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        self.log(
            f"warning: step {step}: loss {loss} / gradient norm {norm} not finite; update "
            f"skipped ({self.in_a_row} in a row, stop at --max-bad-steps {self.max_bad})"
        )
        if self.in_a_row >= self.max_bad:
            saved = f"; the newest checkpoint is {last_saved}" if last_saved else ""
            raise Diverged(
                f"training diverged at step {step}: {self.in_a_row} steps in a row had a "
                f"non-finite loss or gradient (skipped, nothing saved from them{saved}); lower "
                f"--learning-rate (now {self.cfg.learning_rate:g}){self._dtype_hint()}"
            )
        return True

    def check_trained(self, first: int, last: int) -> None:
        """After a run's steps `first`..`last`: `Diverged` when every one was skipped (too
        few steps to reach max_bad in a row): nothing was trained, and saving the unchanged
        adapter would report it as trained."""
        if last >= first and self.total == last - first + 1:
            where = f"step {first}" if first == last else f"steps {first}-{last}"
            raise Diverged(
                f"training diverged: every step of this run ({where}) had a non-finite loss "
                f"or gradient and was skipped; nothing was trained and no adapter was saved; "
                f"lower --learning-rate (now {self.cfg.learning_rate:g}){self._dtype_hint()}"
            )

    def _dtype_hint(self) -> str:
        if self.cfg.dtype == "float16":
            return " or train in --dtype bfloat16 / float32 (float16 overflows)"
        if self.cfg.dtype in (None, "bfloat16"):
            return " or try --dtype float32"
        return ""


@dataclass
class StepSnapshot:
    """References to the weights, optimizer state and data position of the last completed
    step (MLX arrays are immutable, so holding them copies nothing)."""

    params: dict
    opt_state: dict
    position: tuple

    @classmethod
    def take(cls, model: nn.Module, optimizer: optim.Optimizer, state) -> StepSnapshot:
        return cls(
            dict(tree_flatten(model.trainable_parameters())),
            tree_map(lambda x: x, optimizer.state),
            (state.step, state.epoch, state.batch, state.trained_tokens),
        )

    def restore(self, model: nn.Module, optimizer: optim.Optimizer, state) -> None:
        model.update(tree_unflatten(list(self.params.items())))
        optimizer.state = self.opt_state
        state.step, state.epoch, state.batch, state.trained_tokens = self.position


class StopSignals:
    """SIGINT / SIGTERM while inside `watch()`: the first sets `signum` (the loop stops after
    the current step); a second raises KeyboardInterrupt (abandon the step now)."""

    def __init__(self):
        self.signum: int | None = None

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: safe inside a signal handler (print could re-enter a busy stderr buffer)
        os.write(2, b"\nstopping after this step (send the signal again to stop now)\n")

    @contextmanager
    def watch(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        saved = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in saved.items():
                signal.signal(s, h)


class RunGuard:
    """What `train_loop` asks once per step: `begin_step` (snapshot of the last completed
    step), `check` (was this step's update skipped? stop after too many), `stop_requested`
    (a signal arrived: leave the loop after this step)."""

    def __init__(self, cfg, run_dir=None, log=print):
        self.divergence = DivergenceGuard(cfg, log)
        self.signals = StopSignals()
        self.run_dir = run_dir
        self.snapshot: StepSnapshot | None = None

    def begin_step(self, model: nn.Module, optimizer: optim.Optimizer, state) -> None:
        self.snapshot = StepSnapshot.take(model, optimizer, state)

    def check(self, step: int, loss: mx.array, norm: mx.array) -> bool:
        loss_f, norm_f = float(loss), float(norm)
        last = None
        if self.run_dir is not None and not (math.isfinite(loss_f) and math.isfinite(norm_f)):
            found = list_checkpoints(self.run_dir)
            last = found[-1] if found else None
        return self.divergence.check(step, loss_f, norm_f, last_saved=last)

    @property
    def stop_requested(self) -> int | None:
        return self.signals.signum
