"""`train(config)`: from a model and a feedback file to a trained LoRA adapter.

    train(cfg)       begin (setup.py: config copy, ranks, resume, run folder, reporters)
                     -> load the base model (model/load.py)
                     -> train_model: setup (setup.py: LoRA, rows, optimizer, reference: a Run)
                                     -> loop (loop.py: the steps, guarded here)
                                     -> finish (here: adapter, final eval, plot)

`mlx_kto.api.KTOTrainer` runs the same `begin` and `train_model` on a model already loaded.
`python -m mlx_kto.train ...` is the same command as `mlx-kto train ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.model.load import load_base, save_adapter
from mlx_kto.reference.cache import check_cache_root
from mlx_kto.runtime import heap as _heap
from mlx_kto.runtime.atomic import write_errors
from mlx_kto.train.checkpoint import list_checkpoints
from mlx_kto.train.eval import FINAL_EVAL_KEYS, evaluate, format_eval
from mlx_kto.train.guard import Interrupted
from mlx_kto.train.loop import train_loop
from mlx_kto.train.prepare import prepare_data, tokenize_split
from mlx_kto.train.setup import Start, begin, resolve_run_dir, set_memory_limits, setup
from mlx_kto.train.state import Extras, Run, save_run_checkpoint

import mlx.nn as nn

# Importable from here as before (judge/, cli/, demo/, tests).
__all__ = [
    "Extras",
    "TrainResult",
    "prepare_data",
    "resolve_run_dir",
    "set_memory_limits",
    "tokenize_split",
    "train",
    "train_model",
]


@dataclass
class TrainResult:
    adapter_path: Path  # folder with adapters.safetensors + adapter_config.json
    metrics_path: Path  # metrics.jsonl
    steps: int
    final_metrics: dict  # last training step's metrics
    eval_metrics: dict  # final evaluation on the validation split (empty without one)
    reference: dict  # reference-pass counters


def train(
    cfg: KTOConfig, log=print, callbacks: list | None = None, extras: Extras | None = None
) -> TrainResult:
    """Train a KTO LoRA adapter as configured (`mlx-kto train`): load cfg.model, then
    `train_model`. Returns where the adapter went and the final metrics. `cfg` itself is
    not changed. Under `mlx.launch` every rank runs this; rank 0 alone logs and writes."""
    start = begin(cfg, log, callbacks, extras)
    try:
        if not start.cfg.no_ref_cache:  # a cache folder that is a file: say so before loading
            check_cache_root(start.cfg.ref_cache)
        model, tokenizer, model_path, _ = load_base(start.cfg, start.log)
    except BaseException:
        start.callbacks.close()
        raise
    return train_model(start, model, tokenizer, model_path)


def train_model(
    start: Start,
    model: nn.Module,
    tokenizer,
    model_path: str | Path | None = None,
    splits: dict | None = None,
) -> TrainResult:
    """Train an already loaded `model` / `tokenizer` (the work behind `train` and
    `mlx_kto.api.KTOTrainer`): setup -> loop -> finish. `start` is `setup.begin(cfg, ...)`;
    `splits` ({"train": [Example], "valid": ...}) replaces cfg.data; `model_path` (the base
    folder) keys the reference cache."""
    try:
        run = setup(start, model, tokenizer, model_path, splits)
        last = run_guarded(run)
        return finish(run, last, start.extras)
    finally:
        start.callbacks.close()


def run_guarded(run: Run) -> dict:
    """`train_loop(run)` with SIGINT / SIGTERM caught (guard.StopSignals) and write errors as
    one line. A first signal ends the loop after its step (checkpointed by the loop); a
    second abandons the step in flight: the last completed step is restored and
    checkpointed. Either way the adapter is saved (by rank 0) and `Interrupted` (exit 130 /
    143) raised."""
    guard, state, is_main = run.guard, run.state, run.dist.is_main
    try:
        with write_errors(run.run_dir), guard.signals.watch():
            last = train_loop(run)
    except KeyboardInterrupt:
        if guard.signals.signum is None or guard.snapshot is None:
            raise
        guard.snapshot.restore(run.model, run.optimizer, state)
        if state.step > 0 and is_main:
            save_run_checkpoint(run)
    if guard.stop_requested is None:
        return last
    found = list_checkpoints(run.run_dir)
    if state.step > 0 and is_main:
        save_adapter(run.model, run.run_dir, run.adapter_config)
    raise Interrupted(guard.stop_requested, state.step, run.run_dir, found[-1] if found else None)


def finish(run: Run, last: dict, extras: Extras) -> TrainResult:
    """After the last step: the adapter (rank 0), the final evaluation, the plot."""
    _heap.release()  # the freed training memory goes back before saving, eval and the plot
    if run.dist.is_main:
        save_adapter(run.model, run.run_dir, run.adapter_config)
    ev = {}
    if run.valid_rows:
        cfg = run.cfg
        ev = evaluate(
            run.model, run.valid_rows, cfg, run.scorer, run.desirable_weight,
            cfg.eval_batches, run.pad_id,
        )  # fmt: skip
        run.log(format_eval("final eval: ", ev, FINAL_EVAL_KEYS))
        run.callbacks.on_eval(run.state.step, ev)
    run.log(f"adapter saved to {run.run_dir}")
    if run.dist.is_main and extras.plot is not None:
        extras.plot(run.run_dir, run.log)
    result = TrainResult(
        run.run_dir, run.run_dir / "metrics.jsonl", run.state.step, last, ev, run.scorer.stats()
    )
    run.callbacks.on_train_end(result)
    return result
