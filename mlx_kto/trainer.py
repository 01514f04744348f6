"""The KTO training loop: compiled step, accumulation, schedule, eval, checkpoints.

Per micro-batch: reference log-probs (adapter off, through ReferenceScorer, so
a cache can answer), the policy's KL-sequence log-probs (no gradient), then one
compiled forward/backward of the policy on the main sequences.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path

from mlx_kto import fastops
from mlx_kto.batches import Batch, iterate_batches, num_batches
from mlx_kto.checkpoint import save_checkpoint
from mlx_kto.config import KTOConfig
from mlx_kto.logprobs import (
    active_streams,
    compiled_sequence_logps,
    cpu_row_parallel,
    sequence_logps,
)
from mlx_kto.loss import kto_loss, merge_metrics, metrics_to_floats
from mlx_kto.reference import ReferenceScorer
from mlx_kto.run_dir import append_line, truncate_metrics
from mlx_kto.train_guard import RunGuard, keep_finite_update

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: next micro-batch to read
    batch: int = 0
    trained_tokens: int = 0
    history: list = field(default_factory=list)  # last eval metrics etc.
    meta: dict = field(default_factory=dict)  # stored in checkpoints (data hash: resume.py)


def make_schedule(cfg: KTOConfig, total_steps: int):
    """Linear warmup from 0, then cosine/linear decay to 0 or constant."""
    warmup = (
        cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    )
    warmup = min(warmup, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, 0.0)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, decay_steps)
    else:
        main = lambda _: mx.array(lr, dtype=mx.float32)  # noqa: E731  (AdamW needs an array)
    if warmup <= 0:
        return main
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup), main], [warmup])


def total_steps(cfg: KTOConfig, n_train_rows: int) -> int:
    if cfg.iters:
        return cfg.iters
    per_epoch = num_batches(n_train_rows, cfg.batch_size, _min_batch(cfg))
    return max(1, math.ceil(per_epoch * cfg.epochs / cfg.grad_accumulation_steps))


def _min_batch(cfg: KTOConfig) -> int:
    return 2 if cfg.loss_type == "kto" else 1


def _loss_kwargs(cfg: KTOConfig, desirable_weight: float) -> dict:
    return dict(
        beta=cfg.beta,
        desirable_weight=float(desirable_weight),
        undesirable_weight=cfg.undesirable_weight,
        loss_type=cfg.loss_type,
    )


def policy_kl_logps(model: nn.Module, batch: Batch) -> mx.array | None:
    """The policy's KL-sequence log-probs: used only as the (detached) reference point."""
    if batch.kl_tokens is None:
        return None
    return mx.stop_gradient(
        sequence_logps(model, batch.kl_tokens, batch.kl_mask, head_start=batch.head_start)
    )


@contextmanager
def fast_paths(model: nn.Module) -> Iterator[None]:
    """The CPU backend's fast paths, for everything run inside (a no-op on a GPU, and when
    already inside): every log-prob pass spreads its rows over one stream per core
    (`cpu_row_parallel`), and on x86 the model's attention and SwiGLU use fastops'
    arithmetic exp (`fastops.fast_ops`). Training, evaluation and reference passes
    all run inside, so the policy and its reference compute the same way."""
    with cpu_row_parallel(), fastops.fast_ops(model):
        yield


def _with_fast_paths(fn):
    """Run fn(model, ...) inside `fast_paths(model)`."""

    @wraps(fn)
    def wrapper(model, *args, **kwargs):
        with fast_paths(model):
            return fn(model, *args, **kwargs)

    return wrapper


def _compiled_kl_forward(model: nn.Module):
    """`policy_kl_logps`, compiled (fused elementwise ops: ~20% less forward time on CPU).
    Traced in train mode with the training LoRA scale baked in: only for the training loop,
    never under `reference_mode` or in eval mode. Own compile, so its retraces depend on the
    KL shape alone, not on (main, KL) shape pairs."""
    # KL batches are padded already; the head starts at the shortest prompt (head_start_of).
    kl_logps = compiled_sequence_logps(model, pad_multiple=1)

    def forward(model_, batch: Batch) -> mx.array | None:
        if batch.kl_tokens is None:
            return None
        return mx.stop_gradient(kl_logps(batch.kl_tokens, batch.kl_mask))

    return forward


@_with_fast_paths
def evaluate(
    model: nn.Module,
    rows,
    cfg: KTOConfig,
    scorer: ReferenceScorer,
    desirable_weight: float,
    max_batches: int = -1,
    pad_id: int = 0,
) -> dict:
    """KTO loss, rewards, margins, kl and reward accuracy over `rows` (eval mode)."""
    with_kl = cfg.loss_type == "kto"
    was_training = model.training
    model.eval()
    total = None
    for i, (_, _, batch) in enumerate(
        iterate_batches(
            rows,
            cfg.batch_size,
            seed=cfg.seed,
            shuffle=False,
            pad_multiple=cfg.pad_multiple,
            pad_id=pad_id,
            with_kl=with_kl,
            min_size=_min_batch(cfg),
            loop=False,
        )
    ):
        if max_batches > 0 and i >= max_batches:
            break
        ref, ref_kl = scorer(batch)
        pol = sequence_logps(model, batch.tokens, batch.mask, head_start=batch.head_start)
        kl_pol = policy_kl_logps(model, batch)
        _, metrics = kto_loss(
            pol, ref, kl_pol, ref_kl, batch.labels, **_loss_kwargs(cfg, desirable_weight)
        )
        m = metrics_to_floats(metrics)
        total = m if total is None else merge_metrics(total, m)
    model.train(was_training)
    return total or {}


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line, flushed each write)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines from steps the checkpoint never reached (and a torn one).
            truncate_metrics(path, truncate_after_step)
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        append_line(self.f, self.path, json.dumps(record) + "\n")  # disk full: one line

    def close(self) -> None:
        self.f.close()


def make_train_step(
    model: nn.Module, optimizer: optim.Optimizer, cfg: KTOConfig, desirable_weight: float
):
    """One micro-batch of training, `train_step(batch, scorer, prev_grad, do_update) ->
    (loss, metrics, grad, norm)` (lazy arrays; the caller evaluates them):

    1. reference log-probs of the sequences and KL sequences (`scorer`: cache or one batched
       adapter-off forward, eager, outside every compiled function);
    2. the policy's KL-sequence log-probs, no gradient (compiled on its own);
    3. the compiled policy forward/backward on the main sequences, gradient accumulation
       (`prev_grad`), and on the last micro-batch (`do_update`) averaging, clipping and AdamW.
    Call inside `fast_paths(model)` (as `train_loop` does) for the CPU backend's fast paths."""
    accum = cfg.grad_accumulation_steps
    loss_kw = _loss_kwargs(cfg, desirable_weight)

    def loss_fn(model, tokens, mask, labels, ref, kl_pol, kl_ref, head_start):
        pol = sequence_logps(model, tokens, mask, for_grad=True, head_start=head_start)
        return kto_loss(pol, ref, kl_pol, kl_ref, labels, **loss_kw)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(tokens, mask, labels, ref, kl_pol, kl_ref, head_start, prev_grad, do_update):
        (loss, metrics), grad = loss_and_grad(
            model, tokens, mask, labels, ref, kl_pol, kl_ref, head_start
        )
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        norm = mx.array(0.0)
        if do_update:
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                grad, norm = optim.clip_grad_norm(grad, cfg.max_grad_norm)
            else:
                norm = optim.clip_grad_norm(grad, float("inf"))[1]
            # A non-finite loss or gradient never reaches the weights (train_guard.py).
            keep_finite_update(model, optimizer, grad, loss, norm)
            grad = None
        return loss, metrics, grad, norm

    kl_forward = policy_kl_logps
    eager_step = step
    if cfg.compile:
        cstate = [model.state, optimizer.state, mx.random.state]

        def make_compiled():
            # A new function object per mode: MLX keys its compiled traces by the function.
            return partial(mx.compile, inputs=cstate, outputs=cstate)(lambda *a: eager_step(*a))

        compiled_step = fastops.per_mode(make_compiled)

        def step(*args):
            # Rows on several CPU streams: the eager step (its elementwise pieces compiled in
            # fastops) keeps both cores busy where the whole-step trace leaves a sixth of the
            # time idle, ~10% faster on the bench model (bench/ablation.py).
            if active_streams() > 1:
                return eager_step(*args)
            return compiled_step(*args)

        kl_forward = _compiled_kl_forward(model)

    def train_step(batch: Batch, scorer: ReferenceScorer, prev_grad, do_update: bool):
        ref, ref_kl = scorer(batch)
        kl_pol = kl_forward(model, batch) if cfg.loss_type == "kto" else None
        if kl_pol is not None:
            # Evaluated first, on its own: left lazy, MLX interleaves it with the policy's
            # forward, more activations live at once, and the step is ~25% slower on CPU.
            mx.eval(kl_pol)
        return step(
            batch.tokens,
            batch.mask,
            batch.labels,
            ref,
            kl_pol,
            ref_kl,
            batch.head_start,  # a Python int: a compile-time constant (retraced per value)
            prev_grad,
            do_update,
        )

    return train_step


@_with_fast_paths
def train_loop(
    model: nn.Module,
    cfg: KTOConfig,
    train_rows,
    valid_rows,
    scorer: ReferenceScorer,
    optimizer: optim.Optimizer,
    state: TrainState,
    run_dir: Path,
    adapter_config: dict,
    desirable_weight: float,
    n_steps: int,
    pad_id: int = 0,
    log=print,
    progress: bool = True,
    probe=None,
    callbacks=None,
    guard: RunGuard | None = None,
) -> dict:
    """Run optimizer steps state.step..n_steps; returns the last step's metrics.
    `probe(step, record, n_steps)` (judge.probes) may add diversity figures to a record;
    `callbacks` (a reporting.Callback) hears of every step, evaluation and save."""
    from mlx_kto.model import save_adapter
    from mlx_kto.reporting import Callback, ref_step_stats, show_bar, throughput

    cb = callbacks if callbacks is not None else Callback()

    with_kl = cfg.loss_type == "kto"
    accum = cfg.grad_accumulation_steps
    train_step = make_train_step(model, optimizer, cfg, desirable_weight)
    guard = guard or RunGuard(cfg, run_dir, log)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=state.step)
    batches = iterate_batches(
        train_rows,
        cfg.batch_size,
        seed=cfg.seed,
        start_epoch=state.epoch,
        start_batch=state.batch,
        pad_multiple=cfg.pad_multiple,
        pad_id=pad_id,
        with_kl=with_kl,
        min_size=_min_batch(cfg),
    )
    bar = None
    if progress and not cfg.quiet and show_bar():  # piped output: plain lines instead
        from tqdm import tqdm

        bar = tqdm(total=n_steps, initial=state.step, desc="kto", dynamic_ncols=True, leave=True)

    model.train()
    last = {}
    mx.reset_peak_memory()
    t_window, tok_window, steps_window = time.perf_counter(), 0, 0
    per_epoch = num_batches(len(train_rows), cfg.batch_size, _min_batch(cfg))
    epoch_ref = scorer.stats()
    while state.step < n_steps:
        guard.begin_step(model, optimizer, state)
        t0 = time.perf_counter()
        ref_s0, ref_before = scorer.seconds, scorer.stats()
        grad, agg, ntoks = None, None, 0
        # Dropout randomness is a function of (seed, step), so a resumed run replays it.
        mx.random.seed(cfg.seed * 1_000_003 + state.step)
        for micro in range(accum):
            epoch, bidx, batch = next(batches)
            loss, metrics, grad, norm = train_step(batch, scorer, grad, micro == accum - 1)
            mx.eval(loss, metrics, grad, norm, model.trainable_parameters(), optimizer.state)
            m = metrics_to_floats(metrics)
            agg = m if agg is None else merge_metrics(agg, m)
            ntoks += batch.ntoks
            state.epoch, state.batch = epoch, bidx + 1
            if bidx + 1 == per_epoch:  # an epoch ended: report its reference-pass work
                epoch_ref = _log_epoch_ref(epoch, scorer.stats(), epoch_ref, log, bar)
        skipped = guard.check(state.step + 1, loss, norm)  # raises Diverged after too many
        state.step += 1
        state.trained_tokens += ntoks
        dt = time.perf_counter() - t0
        tok_window, steps_window = tok_window + ntoks, steps_window + 1
        record = {
            "step": state.step,
            "epoch": round(state.epoch + state.batch / per_epoch, 4),  # fractional, as TRL
            **agg,
            "lr": float(optimizer.learning_rate),
            "grad_norm": float(norm),
            **({"skipped": True} if skipped else {}),
            "tokens": ntoks,
            "step_time": round(dt, 4),
            "tokens_per_sec": round(ntoks / dt, 1),
            "ref_time": round(scorer.seconds - ref_s0, 4),
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            "num_tokens": state.trained_tokens,  # TRL's name: tokens trained on so far
            **ref_step_stats(ref_before, scorer.stats()),  # this step's, and `_total`s
        }
        last = record
        if cfg.steps_per_eval and valid_rows and state.step % cfg.steps_per_eval == 0:
            ev = evaluate(
                model, valid_rows, cfg, scorer, desirable_weight, cfg.eval_batches, pad_id
            )
            record.update({f"eval/{k}": v for k, v in ev.items()})
            (bar.write if bar is not None else log)(_fmt_eval(state.step, ev))  # above the bar
            cb.on_eval(state.step, ev)
        if probe is not None:
            probe(state.step, record, n_steps)
        metrics_log.write(record)
        cb.on_step(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_postfix(record), refresh=False)
        elif state.step % cfg.steps_per_report == 0 or state.step == n_steps:
            tput = throughput(tok_window, time.perf_counter() - t_window, steps_window)
            log(f"step {state.step}/{n_steps} {_postfix(record, tput)}")
            t_window, tok_window, steps_window = time.perf_counter(), 0, 0
        if cfg.steps_per_save and state.step % cfg.steps_per_save == 0 and state.step < n_steps:
            save_checkpoint(
                run_dir,
                state.step,
                model,
                optimizer,
                _ckpt_state(state, cfg),
                adapter_config,
                keep=cfg.keep_checkpoints,
            )
            save_adapter(model, run_dir, adapter_config)
            cb.on_save(state.step, run_dir)
        if guard.stop_requested:  # SIGINT / SIGTERM: the final checkpoint below, then exit
            break
    if bar is not None:
        bar.close()
    # The final state is always checkpointed so `--resume` can extend a finished run.
    save_checkpoint(
        run_dir,
        state.step,
        model,
        optimizer,
        _ckpt_state(state, cfg),
        adapter_config,
        keep=cfg.keep_checkpoints,
    )
    cb.on_save(state.step, run_dir)
    metrics_log.close()
    return last


def _ckpt_state(state: TrainState, cfg: KTOConfig) -> dict:
    return {
        "epoch": state.epoch,
        "batch": state.batch,
        "trained_tokens": state.trained_tokens,
        "seed": cfg.seed,
        "config": cfg.to_dict(),
        **state.meta,
    }


def _log_epoch_ref(epoch: int, now: dict, before: dict, log, bar) -> dict:
    """One line per epoch: reference cache hits, misses, forwards and seconds in that epoch."""
    keys = ("ref_hits", "ref_misses", "ref_forwards", "ref_seconds")
    d = {k: now.get(k, 0) - before.get(k, 0) for k in keys}
    msg = (
        f"epoch {epoch + 1}: reference {d['ref_hits']} hits, {d['ref_misses']} misses, "
        f"{d['ref_forwards']} forwards, {d['ref_seconds']:.2f}s"
    )
    if bar is None:
        log(msg)
    else:
        with bar.external_write_mode():
            log(msg)
    return now


def _postfix(r: dict, tput: str | None = None) -> str:
    parts = [f"loss {r['loss']:.4f}", f"kl {r.get('kl', 0):.3f}"]
    if "rewards/margins" in r:
        parts.append(f"margin {r['rewards/margins']:+.3f}")
    parts.append(tput or f"{r['tokens_per_sec']:.0f} tok/s (this step)")
    if "eval/loss" in r:
        parts.append(f"eval {r['eval/loss']:.4f}")
    return " ".join(parts)


def _fmt_eval(step: int, ev: dict) -> str:
    keys = (
        "loss",
        "kl",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracy",
    )
    return f"eval @ {step}: " + " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev)
