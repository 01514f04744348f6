"""`train(config)`: from a model and a feedback file to a trained LoRA adapter.

`python -m mlx_kto.train ...` is the same command as `mlx-kto train ...`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config import KTOConfig  # noqa: E402
from mlx_kto.errors import UserError  # noqa: E402

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


def prepare_data(cfg: KTOConfig, tokenizer, log=print):
    """Load, tokenize and pair (KL partners) the train/valid splits; report balance."""
    from mlx_kto.data import load_splits
    from mlx_kto.tokenize import (
        assign_kl_partners,
        auto_desirable_weight,
        balance_report,
        class_counts,
        tokenize_examples,
    )

    if not cfg.data:
        raise UserError("data: no data given (--data FILE_OR_FOLDER)")
    splits = load_splits(cfg.data, seed=cfg.seed)
    out = {}
    for name in ("train", "valid"):
        if name not in splits:
            continue
        rows, stats = tokenize_examples(
            splits[name], tokenizer, cfg.max_length, cfg.max_prompt_length
        )
        if stats.n_dropped_long_prompt:
            log(
                f"warning: {name}: dropped {stats.n_dropped_long_prompt} rows whose prompt alone "
                f"reaches max_length={cfg.max_length} (raise --max-length or set --max-prompt-length)"
            )
        if stats.n_truncated:
            log(f"{name}: truncated {stats.n_truncated} completions to max_length={cfg.max_length}")
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
                f"data: {name} split has {len(rows)} usable rows; need at least {min_rows}"
            )
        if cfg.loss_type == "kto":
            assign_kl_partners(rows, seed=cfg.seed, max_length=cfg.max_length)
        out[name] = rows
    n_d, n_u = class_counts(out["train"])
    dw = cfg.desirable_weight
    if dw == "auto":
        dw = auto_desirable_weight(n_d, n_u, cfg.undesirable_weight)
        log(f"desirable_weight: auto -> {dw:.3f}")
    for line in balance_report(n_d, n_u, float(dw), cfg.undesirable_weight):
        log(line)
    return out["train"], out.get("valid"), float(dw)


def train(cfg: KTOConfig, log=print) -> TrainResult:
    """Train a KTO LoRA adapter as configured; returns where it went and final metrics."""
    from mlx_kto.checkpoint import find_checkpoint, load_checkpoint
    from mlx_kto.config import check_rows_per_step
    from mlx_kto.distributed import (
        broadcast_from_main,
        check_same_step,
        collective,
        init_distributed,
    )
    from mlx_kto.model import (
        adapter_config,
        apply_lora,
        load_base,
        load_init_adapter,
        save_adapter,
        trainable_lora,
    )
    from mlx_kto.reference import make_scorer
    from mlx_kto.trainer import TrainState, evaluate, make_schedule, total_steps, train_loop

    cfg.validate()
    dist = init_distributed(cfg.distributed_timeout)
    check_rows_per_step(cfg, dist.size)
    if not dist.is_main:
        log = lambda *_: None  # noqa: E731  (rank 0 speaks for the run)
    ckpt = None
    if cfg.resume:
        ckpt = find_checkpoint(cfg.resume)
        saved = json.loads((ckpt / "trainer_state.json").read_text())["config"]
        for key in ("model", "data", "init_adapter"):
            if getattr(cfg, key) is None:
                setattr(cfg, key, saved.get(key))
        if cfg.adapter_path == "adapters":
            cfg.adapter_path = str(ckpt.parent.parent)
    mx.random.seed(cfg.seed)
    set_memory_limits(cfg)
    run_dir = Path(cfg.adapter_path)
    run_dir.mkdir(parents=True, exist_ok=True)

    model, tokenizer, model_path, _ = load_base(cfg)
    frozen = None
    if cfg.init_adapter:
        init_conf = load_init_adapter(model, cfg.init_adapter)
        lp = init_conf.get("lora_parameters", {})
        cfg.lora_rank = lp.get("rank", cfg.lora_rank)
        cfg.lora_scale = lp.get("scale", cfg.scale)
        cfg.lora_keys = lp.get("keys", cfg.lora_keys)
        cfg.num_layers = init_conf.get("num_layers", cfg.num_layers)
        frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
        log(f"starting from adapter {cfg.init_adapter}; it is also the (frozen) reference")
    else:
        apply_lora(model, cfg)
    n_layers = cfg.num_layers if cfg.num_layers >= 0 else len(model.layers)
    a_config = adapter_config(cfg, cfg.model, n_layers)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_rows, valid_rows, dw = prepare_data(cfg, tokenizer, log)
    n_steps = total_steps(cfg, len(train_rows), dist.size)
    optimizer = optim.AdamW(
        learning_rate=make_schedule(cfg, n_steps), weight_decay=cfg.weight_decay
    )
    optimizer.init(model.trainable_parameters())
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    state = TrainState()
    if ckpt is not None:
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
    if dist.is_main:
        (run_dir / "kto_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    # Reference fingerprint: model_path + cfg.quantize/q_group_size/dtype/init_adapter.
    scorer = make_scorer(cfg, model, frozen, model_path, log)
    last = train_loop(
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
        dist=dist,
    )
    if dist.is_main:
        save_adapter(model, run_dir, a_config)
    ev = {}
    if valid_rows:
        ev = evaluate(model, valid_rows, cfg, scorer, dw, cfg.eval_batches, pad_id)
        keys = ("loss", "rewards/margins", "rewards/accuracy", "kl")
        log("final eval: " + " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev))
    log(f"adapter saved to {run_dir}")
    return TrainResult(run_dir, run_dir / "metrics.jsonl", state.step, last, ev, scorer.stats())


def main(argv: list[str] | None = None) -> None:
    """`python -m mlx_kto.train`: the same options as `mlx-kto train`."""
    from mlx_kto.cli import run, train_command

    run(train_command, argv if argv is not None else sys.argv[1:], "python -m mlx_kto.train")


if __name__ == "__main__":
    main()
