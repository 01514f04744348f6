"""`train(config)`: from a model and a feedback file to a trained LoRA adapter.

`python -m mlx_kto.train ...` is the same command as `mlx-kto train ...`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.errors import UserError  # noqa: E402
from mlx_kto.runtime import heap as _heap  # noqa: E402
from mlx_kto.runtime.atomic import write_errors, write_json
from mlx_kto.train.guard import Interrupted, RunGuard, all_finite  # noqa: E402
from mlx_kto.train.resume import absolute_paths, check_unchanged, rows_hash  # noqa: E402
from mlx_kto.train.run_dir import clear_run, prepare_run_dir  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402


@dataclass
class TrainResult:
    adapter_path: Path  # folder with adapters.safetensors + adapter_config.json
    metrics_path: Path  # metrics.jsonl
    steps: int
    final_metrics: dict  # last training step's metrics
    eval_metrics: dict  # final evaluation on the validation split (empty without one)
    reference: dict  # reference-pass counters


def set_memory_limits(cfg: KTOConfig) -> None:
    """Keep a small Mac responsive: wired limit (Metal) and buffer-cache cap."""
    if cfg.cache_limit_mb is not None:
        mx.set_cache_limit(cfg.cache_limit_mb * 2**20)
    if mx.metal.is_available():
        if cfg.wired_limit_mb is not None:
            mx.set_wired_limit(cfg.wired_limit_mb * 2**20)
        else:
            from mlx_lm.utils import maybe_set_recommended_wired_limit

            maybe_set_recommended_wired_limit()


def prepare_data(cfg: KTOConfig, tokenizer, log=print, splits: dict | None = None):
    """Load (or take `splits`: {"train": [Example], "valid": ...}), tokenize and pair (KL
    partners) the train/valid splits; report balance."""
    from mlx_kto.data.rows import load_splits
    from mlx_kto.data.tokenize import auto_desirable_weight, balance_report, class_counts

    if splits is None:
        if not cfg.data:
            raise UserError("data: no data given (--data FILE_OR_FOLDER)")
        from mlx_kto.data.columns import FieldMap

        splits = load_splits(
            cfg.data, seed=cfg.seed, fields=FieldMap.from_config(cfg), split=cfg.data_split
        )
    out = {name: tokenize_split(cfg, name, splits[name], tokenizer, log)
           for name in ("train", "valid") if name in splits}  # fmt: skip
    n_d, n_u = class_counts(out["train"])
    dw = cfg.desirable_weight
    if dw == "auto":
        dw = auto_desirable_weight(n_d, n_u, cfg.undesirable_weight)
        log(f"desirable_weight: auto -> {dw:.3f}")
    for line in balance_report(n_d, n_u, float(dw), cfg.undesirable_weight):
        log(line)
    return out["train"], out.get("valid"), float(dw)


def tokenize_split(cfg: KTOConfig, name: str, examples, tokenizer, log=print):
    """Tokenize one split as training does (truncation, KL partners); report what was cut."""
    from mlx_kto.data.tokenize import assign_kl_partners, tokenize_examples

    rows, stats = tokenize_examples(examples, tokenizer, cfg.max_length, cfg.max_prompt_length)
    if stats.n_dropped_long_prompt:
        log(
            f"warning: {name}: dropped {stats.n_dropped_long_prompt} rows whose prompt alone "
            f"reaches max_length={cfg.max_length} (raise --max-length or set --max-prompt-length)"
        )
    if stats.n_truncated:
        log(f"{name}: truncated {stats.n_truncated} completions to max_length={cfg.max_length}")
    if stats.n_prompt_truncated:
        log(
            f"{name}: cut {stats.n_prompt_truncated} prompts to their last "
            f"max_prompt_length={cfg.max_prompt_length} tokens"
        )
    if stats.n_dropped_empty:
        log(f"warning: {name}: dropped {stats.n_dropped_empty} rows with an empty completion")
    if stats.n_boundary_merge:
        log(
            f"{name}: {stats.n_boundary_merge} rows: prompt tokens were not a prefix of "
            "prompt+completion tokens; split at the common prefix (as TRL does)"
        )
    min_rows = 2 if cfg.loss_type == "kto" else 1
    if len(rows) < min_rows:
        raise UserError(
            f"--data (data): {name} split has {len(rows)} usable rows; need at least {min_rows}"
        )
    if cfg.loss_type == "kto":
        assign_kl_partners(rows, seed=cfg.seed, max_length=cfg.max_length)
    if cfg.loss_type in ("dpo", "ipo"):
        from mlx_kto.train.dpo import check_pairs

        check_pairs(rows, name, log)  # unpaired data: one line naming the row
    return rows


@dataclass
class Extras:
    """What the caller adds around training (train/ imports nothing from judge/).

    probe: `(cfg, model, tokenizer, rows, frozen, log) -> probe | None`, a diversity probe
        called as `probe(step, record, n_steps)` (judge.probes.make_probe).
    plot: `(run_dir, log) -> Path | None`, called once after the adapter is saved
        (judge.plot.plot_after_training)."""

    probe: Callable | None = None
    plot: Callable | None = None


def train(
    cfg: KTOConfig, log=print, callbacks: list | None = None, extras: Extras | None = None
) -> TrainResult:
    """Train a KTO LoRA adapter as configured (`mlx-kto train`): load cfg.model, then
    `train_model`. Returns where the adapter went and the final metrics. Under `mlx.launch`
    every rank runs this; rank 0 alone logs and writes."""
    from mlx_kto.config.core import check_rows_per_step
    from mlx_kto.model.load import load_base
    from mlx_kto.train.callbacks import CallbackList, make_reporters
    from mlx_kto.train.checkpoint import find_checkpoint, read_state
    from mlx_kto.train.distributed import init_distributed

    cfg.validate()
    dist = init_distributed(cfg.distributed_timeout)
    check_rows_per_step(cfg, dist.size)
    if not dist.is_main:
        log = _silent  # rank 0 speaks for the run
    ckpt, saved = None, None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        saved = read_state(ckpt)
        for key in ("model", "data", "init_adapter"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, saved["config"].get(key))
    run_dir = resolve_run_dir(cfg, ckpt, dist.is_main)
    if not cfg.no_ref_cache:  # a cache folder that is a file: say so before any work
        from mlx_kto.reference.cache import check_cache_root

        check_cache_root(cfg.ref_cache)
    absolute_paths(cfg)
    mx.random.seed(cfg.seed)
    set_memory_limits(cfg)
    reporters = (
        make_reporters(cfg, run_dir, log) if dist.is_main else []
    )  # before loading: a missing package fails fast
    try:
        model, tokenizer, model_path, _ = load_base(cfg, log)
    except BaseException:
        CallbackList(reporters).close()
        raise
    return train_model(
        cfg, model, tokenizer, model_path, log=log, callbacks=reporters + list(callbacks or []),
        ckpt=ckpt, saved=saved, dist=dist, extras=extras,
    )  # fmt: skip


def train_model(
    cfg: KTOConfig,
    model,
    tokenizer,
    model_path: str | Path | None = None,
    splits: dict | None = None,
    log=print,
    callbacks: list | None = None,
    ckpt: Path | None = None,
    saved: dict | None = None,
    dist=None,
    extras: Extras | None = None,
) -> TrainResult:
    """KTO training of an already loaded `model` / `tokenizer` (the work behind `train` and
    `mlx_kto.api.KTOTrainer`): LoRA insertion, data (`splits` of Examples, or cfg.data),
    reference scorer, loop, final eval, adapter. `model_path` (the base folder) keys the
    reference cache; without it the reference log-probs are not cached on disk. `dist`
    (distributed.Dist) is the ranks `mlx.launch` started; found here when not given."""
    from mlx_kto.train.callbacks import CallbackList
    from mlx_kto.train.distributed import init_distributed

    cb = CallbackList(callbacks)
    dist = dist or init_distributed(cfg.distributed_timeout)
    try:
        return _train_model(
            cfg,
            model,
            tokenizer,
            model_path,
            splits,
            log,
            cb,
            ckpt,
            saved,
            dist,
            extras or Extras(),
        )
    finally:
        cb.close()


def _train_model(
    cfg, model, tokenizer, model_path, splits, log, cb, ckpt, saved, dist, extras
) -> TrainResult:
    from mlx_kto.config.core import check_rows_per_step
    from mlx_kto.model.load import (
        adapter_config,
        apply_lora,
        load_init_adapter,
        save_adapter,
        trainable_lora,
    )
    from mlx_kto.reference.scorer import make_scorer
    from mlx_kto.train.checkpoint import load_checkpoint, read_state
    from mlx_kto.train.distributed import broadcast_from_main, check_same_step, collective
    from mlx_kto.train.loop import TrainState, evaluate, make_schedule, total_steps, train_loop

    if ckpt is not None and saved is None:
        saved = read_state(ckpt)
    check_rows_per_step(cfg, dist.size)
    if not dist.is_main:
        log = _silent
    run_dir = Path(cfg.adapter_path)
    if ckpt is None and dist.is_main:  # checked again for the Python API (idempotent)
        run_dir = prepare_run_dir(cfg.adapter_path, cfg.overwrite)
    if model_path is None and not cfg.no_ref_cache:
        log(
            "reference cache off: an in-memory model has no folder to fingerprint (give model_path)"
        )
        cfg.no_ref_cache = True
    frozen = None
    if cfg.init_adapter:
        init_conf = load_init_adapter(model, cfg.init_adapter)
        lp = init_conf.get("lora_parameters", {})
        cfg.lora_rank = lp.get("rank", cfg.lora_rank)
        cfg.lora_scale = lp.get("scale", cfg.scale)
        cfg.lora_keys = lp.get("keys", cfg.lora_keys)
        cfg.num_layers = init_conf.get("num_layers", cfg.num_layers)
        cfg.fine_tune_type = init_conf.get("fine_tune_type", "lora")
        frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
        if not all_finite(frozen):  # it is the reference: NaN there would poison every step
            raise UserError(f"init_adapter: {cfg.init_adapter} holds non-finite (NaN/inf) weights")
        log(f"starting from adapter {cfg.init_adapter}; it is also the (frozen) reference")
    else:
        apply_lora(model, cfg)
    n_layers = cfg.num_layers if cfg.num_layers >= 0 else len(model.layers)
    a_config = adapter_config(cfg, cfg.model, n_layers)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows, valid_rows, dw = prepare_data(cfg, tokenizer, log, splits)
    n_steps = total_steps(cfg, len(train_rows), dist.size, rows=train_rows)
    optimizer = optim.AdamW(
        learning_rate=make_schedule(cfg, n_steps),
        weight_decay=cfg.weight_decay,
        bias_correction=cfg.adam_bias_correction,
    )
    optimizer.init(model.trainable_parameters())
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
        from mlx_kto.train.loop import checkpoint_paths

        if checkpoint_paths(cfg) and mx.default_device() == mx.cpu:
            log(
                "grad checkpointing: the CPU fast paths that keep activations alive are off "
                "(row streams, arithmetic exp; MLX_KTO_CPU_STREAMS / MLX_KTO_FAST_EXP override)"
            )

    state = TrainState(meta={"data_hash": rows_hash(train_rows)})
    if ckpt is not None:
        check_unchanged(ckpt, saved, cfg, state.meta["data_hash"])
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
        state = TrainState(
            step=saved_state["step"],
            epoch=saved_state["epoch"],
            batch=saved_state["batch"],
            trained_tokens=saved_state.get("trained_tokens", 0),
            meta=state.meta,
        )
        log(f"resumed from {ckpt} at step {state.step}")
        if state.step >= n_steps:
            log(
                f"nothing to do: the checkpoint is at step {state.step} of {n_steps} (raise --iters)"
            )

    check_same_step(state.step, dist)
    if dist.size > 1:  # every rank starts from rank 0's adapter and optimizer state
        model.update(broadcast_from_main(model.trainable_parameters(), dist))
        optimizer.state = broadcast_from_main(optimizer.state, dist)
        with collective(dist, "sharing rank 0's starting adapter"):
            mx.eval(model.trainable_parameters(), optimizer.state)
        log(f"data parallel: {dist.size} ranks, global batch {cfg.rows_per_step(dist.size)} rows")
    n_params = sum(v.size for v in trainable_lora(model).values())
    log(
        f"training {n_params / 1e6:.3f}M LoRA parameters for {n_steps} steps on "
        f"{len(train_rows)} rows (micro-batch {cfg.batch_size} x {cfg.grad_accumulation_steps})"
    )
    # What was trained, with `desirable_weight: auto` resolved: `mlx-kto eval` reads it.
    a_config["kto"]["desirable_weight"] = dw
    if dist.is_main:
        if cfg.overwrite:  # only now: the new run's model and data have loaded
            clear_run(run_dir)
        write_json(run_dir / "kto_config.json", {**cfg.to_dict(), "desirable_weight": dw})
    # Reference fingerprint: model_path + cfg.quantize/q_group_size/dtype/init_adapter.
    scorer = make_scorer(cfg, model, frozen, model_path, log)
    probe = None
    if dist.is_main and extras.probe is not None:  # its figures go to metrics.jsonl (rank 0)
        probe = extras.probe(cfg, model, tokenizer, valid_rows or train_rows, frozen, log)
    elif cfg.diversity_every and extras.probe is None:
        log("diversity probe: not run (pass extras=Extras(probe=judge.probes.make_probe))")
    cb.on_train_begin(
        {"steps": n_steps, "rows": len(train_rows), "run_dir": run_dir, "config": cfg.to_dict()}
    )
    guard = RunGuard(cfg, run_dir, log)
    loop = partial(
        train_loop,
        model,
        cfg,
        train_rows,
        valid_rows,
        scorer,
        optimizer,
        state,
        run_dir,
        a_config,
        dw,
        n_steps,
        pad_id=pad_id,
        log=log,
        probe=probe,
        callbacks=cb,
        guard=guard,
        dist=dist,
    )
    last = run_guarded(loop, guard, model, optimizer, state, cfg, run_dir, a_config, dist)
    _heap.release()  # the freed training memory goes back before saving, eval and the plot
    if dist.is_main:
        save_adapter(model, run_dir, a_config)
    ev = {}
    if valid_rows:
        ev = evaluate(model, valid_rows, cfg, scorer, dw, cfg.eval_batches, pad_id)
        keys = ("loss", "rewards/margins", "rewards/accuracy", "rewards/accuracies", "kl")
        log("final eval: " + " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev))
        cb.on_eval(state.step, ev)
    log(f"adapter saved to {run_dir}")
    if dist.is_main and extras.plot is not None:
        extras.plot(run_dir, log)
    result = TrainResult(run_dir, run_dir / "metrics.jsonl", state.step, last, ev, scorer.stats())
    cb.on_train_end(result)
    return result


def resolve_run_dir(cfg: KTOConfig, ckpt: Path | None, is_main: bool = True) -> Path:
    """The output folder, created and checked (run_dir.prepare_run_dir). On --resume it is the
    resumed run's folder unless --adapter-path names another one (a branch). Ranks other than
    0 (`is_main` False) only learn its name: rank 0 creates and checks it."""
    from mlx_kto.train.resume import check_no_newer, run_dir_of

    if ckpt is not None and cfg.adapter_path == "adapters":  # continue in the folder resumed
        cfg.adapter_path = str(run_dir_of(ckpt))
    if not is_main:
        return Path(cfg.adapter_path)
    if ckpt is None:
        return prepare_run_dir(cfg.adapter_path, cfg.overwrite)
    run_dir = Path(cfg.adapter_path)
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


def run_guarded(
    loop, guard, model, optimizer, state, cfg: KTOConfig, run_dir, a_config, dist=None
) -> dict:
    """`loop()` with SIGINT / SIGTERM caught (train_guard.StopSignals) and write errors as one
    line. A first signal ends the loop after its step (checkpointed by the loop); a second
    abandons the step in flight: the last completed step is restored and checkpointed. Either
    way the adapter is saved (by rank 0) and `Interrupted` (exit 130 / 143) raised."""
    from mlx_kto.model.load import save_adapter
    from mlx_kto.train.checkpoint import list_checkpoints
    from mlx_kto.train.loop import checkpoint_step

    is_main = dist is None or dist.is_main
    try:
        with write_errors(run_dir), guard.signals.watch():
            last = loop()
    except KeyboardInterrupt:
        if guard.signals.signum is None or guard.snapshot is None:
            raise
        guard.snapshot.restore(model, optimizer, state)
        if state.step > 0 and is_main:
            checkpoint_step(run_dir, state, model, optimizer, cfg, a_config, dist)
    if guard.stop_requested is None:
        return last
    found = list_checkpoints(run_dir)
    if state.step > 0 and is_main:
        save_adapter(model, run_dir, a_config)
    raise Interrupted(guard.stop_requested, state.step, run_dir, found[-1] if found else None)


def _silent(*_args, **_kw) -> None:
    """The log of ranks other than 0."""
