"""Setting a run up, in two halves around loading the model:

- `begin(cfg)`: what needs no model. The run's own copy of the config (the caller's is never
  changed: every change is a `dataclasses.replace`), the ranks, the checkpoint to resume,
  the run folder (created and checked: a mistyped path fails before any loading), the
  reporters (a missing wandb fails fast).
- `setup(start, model, tokenizer)`: LoRA (or the starting adapter, frozen as the reference),
  the rows, the optimizer and its schedule, the checkpoint's weights and data position, rank
  0's start shared with every rank, the reference scorer: a `state.Run`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_kto.config.core import KTOConfig, check_rows_per_step
from mlx_kto.errors import UserError
from mlx_kto.model.load import (
    adapter_config,
    all_finite,
    apply_lora,
    load_init_adapter,
    trainable_lora,
)
from mlx_kto.reference.scorer import make_scorer
from mlx_kto.runtime import tape
from mlx_kto.runtime.atomic import write_json
from mlx_kto.train.callbacks import CallbackList, make_reporters
from mlx_kto.train.checkpoint import find_checkpoint, load_checkpoint, read_state
from mlx_kto.train.distributed import (
    Dist,
    broadcast_from_main,
    check_same_inputs,
    check_same_step,
    collective,
    init_distributed,
)
from mlx_kto.train.fast_paths import checkpoint_paths
from mlx_kto.train.prepare import prepare_data
from mlx_kto.train.resume import (
    absolute_paths,
    check_no_newer,
    check_unchanged,
    from_checkpoint,
    rows_hash,
    run_dir_of,
    setup_hash,
)
from mlx_kto.train.run_dir import clear_run, prepare_run_dir
from mlx_kto.train.schedule import make_schedule, total_steps
from mlx_kto.train.state import Extras, Run, TrainState

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim


@dataclass
class Start:
    """What a run knows before its model loads (`begin`)."""

    cfg: KTOConfig  # the run's own copy: validated, resumed fields filled, paths absolute
    dist: Dist
    log: Callable[[str], None]  # silent on ranks other than 0
    run_dir: Path
    callbacks: CallbackList  # the reporters (--report-to) and the caller's callbacks
    extras: Extras
    checkpoint: Path | None = None  # the checkpoint resumed
    saved: dict | None = None  # its trainer_state.json


def begin(
    cfg: KTOConfig, log=print, callbacks: list | None = None, extras: Extras | None = None
) -> Start:
    """Everything before the model loads (see the module docstring). `cfg` is not changed."""
    cfg = replace(cfg).validate()
    dist = init_distributed(cfg.distributed_timeout)
    check_rows_per_step(cfg, dist.size)
    if not dist.is_main:
        log = silent  # rank 0 speaks for the run
    ckpt, saved = None, None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        saved = read_state(ckpt)
        cfg = from_checkpoint(cfg, ckpt, saved)
    run_dir = resolve_run_dir(cfg, ckpt, dist.is_main)
    cfg = absolute_paths(cfg)
    tape.widen(cfg.grad_checkpoint)  # before the run's first evaluation (runtime/tape.py)
    mx.random.seed(cfg.seed)
    set_memory_limits(cfg)
    # Before loading: a missing package (wandb, tensorboard) fails fast.
    reporters = make_reporters(cfg, run_dir, log) if dist.is_main else []
    cb = CallbackList(reporters + list(callbacks or []))
    return Start(cfg, dist, log, run_dir, cb, extras or Extras(), ckpt, saved)


def resolve_run_dir(cfg: KTOConfig, ckpt: Path | None, is_main: bool = True) -> Path:
    """The output folder cfg.adapter_path, created and checked (run_dir.prepare_run_dir).
    On --resume it is the resumed run's folder (`resume.from_checkpoint`) or another one (a
    branch). Ranks other than 0 (`is_main` False) only learn its name: rank 0 creates it."""
    run_dir = Path(cfg.adapter_path)
    if not is_main:
        return run_dir
    if ckpt is None:
        check_overwrite_spares_inputs(cfg, run_dir)
        return prepare_run_dir(run_dir, cfg.overwrite)
    same = run_dir.exists() and run_dir.resolve() == run_dir_of(ckpt).resolve()
    if same and cfg.overwrite:
        raise UserError(
            "overwrite: --overwrite would delete the run being resumed; drop it, or give "
            "--adapter-path NEW_FOLDER"
        )
    run_dir = prepare_run_dir(run_dir, cfg.overwrite, resuming=same)
    if same:
        check_no_newer(ckpt, run_dir)
    return run_dir


def check_overwrite_spares_inputs(cfg: KTOConfig, run_dir: Path) -> None:
    """--overwrite removes run_dir's run files (run_dir.RUN_FILES) once the inputs have
    loaded; a starting adapter among them (the run's own adapter, or one of its checkpoints)
    would be deleted and then missed: refuse before anything is touched."""
    if not (cfg.overwrite and cfg.init_adapter and run_dir.is_dir()):
        return
    init, run = Path(cfg.init_adapter).expanduser().resolve(), run_dir.resolve()
    if init == run or run / "checkpoints" in init.parents:
        raise UserError(
            f"overwrite: --overwrite would delete the starting adapter {cfg.init_adapter} (it is "
            f"in {run_dir}, the run being replaced); give --adapter-path NEW_FOLDER"
        )


def set_memory_limits(cfg: KTOConfig) -> None:
    """Keep a small Mac responsive: wired limit (Metal) and buffer-cache cap."""
    if cfg.cache_limit_mb is not None:
        mx.set_cache_limit(cfg.cache_limit_mb * 2**20)
    if mx.metal.is_available():
        if cfg.wired_limit_mb is not None:
            mx.set_wired_limit(cfg.wired_limit_mb * 2**20)
        else:
            from mlx_lm.utils import maybe_set_recommended_wired_limit  # Metal only

            maybe_set_recommended_wired_limit()


def setup(
    start: Start, model: nn.Module, tokenizer, model_path: str | Path | None = None,
    splits: dict | None = None,
) -> Run:  # fmt: skip
    """The Run of a loaded `model` / `tokenizer` (see the module docstring). `splits`
    ({"train": [Example], "valid": ...}) replaces cfg.data; `model_path` (the base folder)
    keys the reference cache: without it reference log-probs are not cached on disk."""
    cfg, log, dist = start.cfg, start.log, start.dist
    if model_path is None and not cfg.no_ref_cache:
        log(
            "reference cache off: an in-memory model has no folder to fingerprint (give model_path)"
        )
        cfg = replace(cfg, no_ref_cache=True)
    cfg, frozen = attach_adapter(cfg, model, log)
    n_layers = cfg.num_layers if cfg.num_layers >= 0 else len(model.layers)
    a_config = adapter_config(cfg, cfg.model, n_layers)
    train_rows, valid_rows, dw = prepare_data(cfg, tokenizer, log, splits)
    data_hash = rows_hash(train_rows)
    check_same_inputs(data_hash, len(train_rows), setup_hash(cfg), dist)
    n_steps = total_steps(cfg, len(train_rows), dist.size, rows=train_rows)
    optimizer = make_optimizer(cfg, model, n_steps, log)
    state = TrainState(meta={"data_hash": data_hash})
    if start.checkpoint is not None:
        state = restore(start, cfg, model, optimizer, state)
        if state.step >= n_steps:
            log(
                f"nothing to do: the checkpoint is at step {state.step} of {n_steps} (raise --iters)"
            )
    share_start(model, optimizer, state, dist, log, cfg)
    n_params = sum(v.size for v in trainable_lora(model).values())
    log(
        f"training {n_params / 1e6:.3f}M LoRA parameters for {n_steps} steps on "
        f"{len(train_rows)} rows (micro-batch {cfg.batch_size} x {cfg.grad_accumulation_steps})"
    )
    # What was trained, with `desirable_weight: auto` resolved: `mlx-kto eval` reads it.
    a_config["kto"]["desirable_weight"] = dw
    if dist.is_main:
        if cfg.overwrite:  # only now: the new run's model and data have loaded
            clear_run(start.run_dir)
        write_json(start.run_dir / "kto_config.json", {**cfg.to_dict(), "desirable_weight": dw})
    # Reference fingerprint: model_path + cfg.quantize/q_group_size/dtype/init_adapter.
    scorer = make_scorer(cfg, model, frozen, model_path, log)
    probe = None
    if dist.is_main and start.extras.probe is not None:  # its figures go to metrics.jsonl
        probe = start.extras.probe(cfg, model, tokenizer, valid_rows or train_rows, frozen, log)
    elif cfg.diversity_every and start.extras.probe is None:
        log("diversity probe: not run (pass extras=Extras(probe=judge.probes.make_probe))")
    start.callbacks.on_train_begin(
        {
            "steps": n_steps,
            "rows": len(train_rows),
            "run_dir": start.run_dir,
            "config": cfg.to_dict(),
        }
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Run(
        cfg, model, optimizer, train_rows, scorer, start.run_dir, a_config, n_steps,
        valid_rows=valid_rows, desirable_weight=dw, pad_id=pad_id, state=state, dist=dist,
        log=log, callbacks=start.callbacks, probe=probe,
    )  # fmt: skip


def attach_adapter(cfg: KTOConfig, model: nn.Module, log) -> tuple[KTOConfig, dict | None]:
    """New LoRA layers (cfg's rank, keys, layers), or the starting adapter cfg.init_adapter,
    whose own settings then replace cfg's LoRA fields. Returns (the config as trained, the
    starting adapter's weights, frozen: the reference, or None)."""
    if not cfg.init_adapter:
        apply_lora(model, cfg)
        return cfg, None
    init_conf = load_init_adapter(model, cfg.init_adapter)
    lp = init_conf.get("lora_parameters", {})
    cfg = replace(
        cfg,
        lora_rank=lp.get("rank", cfg.lora_rank),
        lora_scale=lp.get("scale", cfg.scale),
        lora_keys=lp.get("keys", cfg.lora_keys),
        num_layers=init_conf.get("num_layers", cfg.num_layers),
        fine_tune_type=init_conf.get("fine_tune_type", "lora"),
    )
    frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
    if not all_finite(frozen):  # it is the reference: NaN there would poison every step
        raise UserError(f"init_adapter: {cfg.init_adapter} holds non-finite (NaN/inf) weights")
    log(f"starting from adapter {cfg.init_adapter}; it is also the (frozen) reference")
    return cfg, frozen


def make_optimizer(cfg: KTOConfig, model: nn.Module, n_steps: int, log) -> optim.Optimizer:
    """AdamW on the LoRA weights with the run's schedule; gradient checkpointing if asked."""
    optimizer = optim.AdamW(
        learning_rate=make_schedule(cfg, n_steps),
        weight_decay=cfg.weight_decay,
        bias_correction=cfg.adam_bias_correction,
    )
    optimizer.init(model.trainable_parameters())
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint  # imports torch: only when asked

        grad_checkpoint(model.layers[0])
        if checkpoint_paths(cfg) and mx.default_device() == mx.cpu:
            log(
                "grad checkpointing: the CPU fast paths that keep activations alive are off "
                "(row streams, arithmetic exp; MLX_KTO_CPU_STREAMS / MLX_KTO_FAST_EXP override)"
            )
    return optimizer


def restore(
    start: Start, cfg: KTOConfig, model: nn.Module, optimizer: optim.Optimizer, state: TrainState
) -> TrainState:
    """The resumed checkpoint's weights, optimizer state and data position, after checking
    that it continues this run (same data and setup, same number of ranks)."""
    ckpt, dist = start.checkpoint, start.dist
    check_unchanged(ckpt, start.saved, cfg, state.meta["data_hash"])
    saved_state = load_checkpoint(ckpt, model, optimizer)
    saved_world = saved_state.get("world_size", 1)
    if saved_world != dist.size:
        raise UserError(
            f"resume: {ckpt} was written by a run on {saved_world} rank(s); this run has "
            f"{dist.size}: resume with the same number of ranks (mlx.launch -n / hostfile)"
        )
    if "global_batch" not in saved_state and cfg.grad_accumulation_steps > 1:
        # Written before data positions counted global batches: it counted micro-batches.
        saved_state["batch"] = -(-saved_state["batch"] // cfg.grad_accumulation_steps)
    start.log(f"resumed from {ckpt} at step {saved_state['step']}")
    return TrainState(
        step=saved_state["step"],
        epoch=saved_state["epoch"],
        batch=saved_state["batch"],
        trained_tokens=saved_state.get("trained_tokens", 0),
        meta=state.meta,
    )


def share_start(model, optimizer, state: TrainState, dist: Dist, log, cfg: KTOConfig) -> None:
    """Every rank at the same step, starting from rank 0's adapter and optimizer state."""
    check_same_step(state.step, dist)
    if dist.size > 1:
        model.update(broadcast_from_main(model.trainable_parameters(), dist))
        optimizer.state = broadcast_from_main(optimizer.state, dist)
        with collective(dist, "sharing rank 0's starting adapter"):
            mx.eval(model.trainable_parameters(), optimizer.state)
        log(f"data parallel: {dist.size} ranks, global batch {cfg.rows_per_step(dist.size)} rows")


def silent(*_args, **_kw) -> None:
    """The log of ranks other than 0."""
