"""The KTO training loop: compiled step, accumulation, schedule, eval, checkpoints.

Per optimizer step (`step.run_step`): for each micro-batch, reference log-probs (adapter
off, through ReferenceScorer, so a cache can answer) and the policy's KL-sequence log-probs
(no gradient); the KL reference point over the step (and every rank); then one compiled
forward/backward of the policy per micro-batch on the main sequences.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, wraps
from pathlib import Path
from typing import NamedTuple

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import Batch, iterate_batches, num_batches
from mlx_kto.model.logit_stats import logit_stats
from mlx_kto.model.logprobs import compiled_sequence_logps, sequence_logps
from mlx_kto.reference.scorer import ReferenceScorer
from mlx_kto.runtime import fastops
from mlx_kto.runtime.atomic import append_line
from mlx_kto.runtime.fastpaths import checkpoint_paths, fast_paths  # noqa: F401  (re-exported)
from mlx_kto.runtime.streams import active_streams, row_groups, row_streams, rows_unsplit
from mlx_kto.runtime.switches import GROUPED_STEP
from mlx_kto.train import packed_step
from mlx_kto.train.checkpoint import save_checkpoint
from mlx_kto.train.distributed import Dist, sum_gradients
from mlx_kto.train.dpo import (
    is_paired,
    iterate_pair_batches,
    iterate_pair_steps,
    pair_batches_per_epoch,
    paired_loss,
)
from mlx_kto.train.guard import RunGuard, keep_finite_update
from mlx_kto.train.loss import kto_loss, merge_metrics, metrics_to_floats
from mlx_kto.train.run_dir import truncate_metrics
from mlx_kto.train.step import global_batch_size, iterate_steps, run_step

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


def total_steps(cfg: KTOConfig, n_train_rows: int, world_size: int = 1, rows=None) -> int:
    """Optimizer steps: one per global batch (micro-batch x accumulation x ranks rows; pairs
    for dpo/ipo, which need the tokenized `rows` to count them)."""
    if cfg.iters:
        return cfg.iters
    return max(1, math.ceil(batches_per_epoch(cfg, n_train_rows, world_size, rows) * cfg.epochs))


def batches_per_epoch(cfg: KTOConfig, n_train_rows: int, world_size: int, rows=None) -> int:
    size = global_batch_size(cfg, world_size)
    if is_paired(cfg):
        if rows is None:
            raise ValueError("dpo/ipo: batches_per_epoch needs the rows to count pairs")
        return pair_batches_per_epoch(rows, size)
    return num_batches(n_train_rows, size, _min_batch(cfg))


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


def _with_fast_paths(fn):
    """Run fn(model, cfg, ...) inside `fast_paths(model)` (without the fast paths that undo
    gradient checkpointing when cfg asks for it: `checkpoint_paths`)."""

    @wraps(fn)
    def wrapper(model, *args, **kwargs):
        cfg = kwargs.get("cfg") or next((a for a in args if isinstance(a, KTOConfig)), None)
        with fast_paths(model, **checkpoint_paths(cfg)):
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
    """KTO loss, rewards, margins, kl and reward accuracy over `rows` (eval mode); for
    dpo/ipo the paired loss and TRL DPOTrainer's metrics over every pair of `rows`."""
    with_kl = cfg.loss_type == "kto"
    was_training = model.training
    model.eval()
    total = None
    if is_paired(cfg):
        batches = iterate_pair_batches(rows, cfg.batch_size, cfg.pad_multiple, pad_id)
    else:
        batches = (b for _, _, b in iterate_batches(
            rows,
            max(cfg.batch_size, _min_batch(cfg)),  # a 1-row micro-batch has no KL estimate
            seed=cfg.seed,
            shuffle=False,
            pad_multiple=cfg.pad_multiple,
            pad_id=pad_id,
            with_kl=with_kl,
            min_size=_min_batch(cfg),
            loop=False,
        ))  # fmt: skip
    for i, batch in enumerate(batches):
        if max_batches > 0 and i >= max_batches:
            break
        ref, ref_kl = scorer(batch)
        pol = sequence_logps(model, batch.tokens, batch.mask, head_start=batch.head_start)
        if is_paired(cfg):
            _, metrics = paired_loss(pol, ref, batch.mask, cfg)
        else:
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


class StepFns(NamedTuple):
    """What `step.run_step` calls: the no-grad KL forward, one weighted gradient pass (with the
    update on the last micro-batch) and the bare update (a rank with no rows in a step)."""

    kl_forward: Callable  # (model, batch) -> [B] or None
    # (batch, ref, z, weight, prev_grad, do_update) -> (loss, metrics, grad, norm)
    grad_step: Callable
    update: Callable  # (grad, loss=None) -> norm


def make_step_fns(
    model: nn.Module,
    optimizer: optim.Optimizer,
    cfg: KTOConfig,
    desirable_weight: float,
    dist: Dist | None = None,
) -> StepFns:
    """The pieces of one optimizer step (lazy arrays; the caller evaluates them):

    1. `kl_forward`: the policy's KL-sequence log-probs, no gradient (compiled on its own);
    2. `grad_step`: the compiled policy forward/backward on the main sequences with a given
       reference point z (no gradient) and row weight w, accumulated onto `prev_grad`:
       g += w ∇ mean(L); on the last micro-batch (`do_update`) the sum over ranks, clipping
       and AdamW. The weights of a step sum to 1 over every rank (`mlx_kto.train.step`).
    Call inside `fast_paths(model)` (as `train_loop` does) for the CPU backend's fast paths."""
    dist = dist or Dist()
    loss_kw = _loss_kwargs(cfg, desirable_weight)
    paired = is_paired(cfg)

    def loss_fn(model, tokens, mask, labels, ref, z, weight, head_start):
        pol = sequence_logps(model, tokens, mask, for_grad=True, head_start=head_start)
        if paired:  # rows [chosen..., rejected...]; z is KTO's alone (None here)
            loss, metrics = paired_loss(pol, ref, mask, cfg)
        else:
            loss, metrics = kto_loss(pol, ref, None, None, labels, kl_reference_point=z, **loss_kw)
        return weight * loss, metrics

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def update(grad, loss=None):
        grad = sum_gradients(grad, dist)
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            grad, norm = optim.clip_grad_norm(grad, cfg.max_grad_norm)
        else:
            norm = optim.clip_grad_norm(grad, float("inf"))[1]
        # A non-finite loss or gradient never reaches the weights (train_guard.py); the norm
        # is over the gradient summed across ranks, so every rank makes the same choice.
        keep_finite_update(model, optimizer, grad, mx.array(0.0) if loss is None else loss, norm)
        return norm

    def finish(grad, metrics, prev_grad, do_update):
        """Accumulate onto prev_grad; on the last micro-batch, the update."""
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        norm = mx.array(0.0)
        if do_update:
            norm = update(grad, metrics["loss"])
            grad = None
        return metrics["loss"], metrics, grad, norm

    def step(tokens, mask, labels, ref, z, weight, head_start, prev_grad, do_update):
        (_, metrics), grad = loss_and_grad(model, tokens, mask, labels, ref, z, weight, head_start)
        return finish(grad, metrics, prev_grad, do_update)

    kl_forward = policy_kl_logps
    eager_step = step
    if cfg.compile:
        cstate = [model.state, optimizer.state, mx.random.state]

        def make_compiled():
            # A new function object per mode: MLX keys its compiled traces by the function.
            return partial(mx.compile, inputs=cstate, outputs=cstate)(lambda *a: eager_step(*a))

        compiled_step = fastops.per_mode(make_compiled)

        def step(*args):
            # Rows on several CPU streams: the eager step keeps both cores busy where the
            # whole-step trace leaves a sixth of the time idle (bench/ablation.py); for KTO
            # `_grouped` below replaces it with one compiled trace per stream's rows.
            if active_streams() > 1:
                return eager_step(*args)
            return compiled_step(*args)

        kl_forward = _compiled_kl_forward(model)
        if not paired and GROUPED_STEP.flag() is not False:
            step = _grouped(step, model, loss_kw, finish)

    def grad_step(batch: Batch, ref, z, weight, prev_grad, do_update: bool):
        return step(
            batch.tokens,
            batch.mask,
            batch.labels,
            ref,
            z,
            weight,
            batch.head_start,  # a Python int: a compile-time constant (retraced per value)
            prev_grad,
            do_update,
        )

    if not paired:  # packed micro-batches (data/packing.py) take their own passes
        kl_forward, grad_step = packed_step.wrap(model, cfg, loss_kw, finish, kl_forward, grad_step)
    return StepFns(kl_forward, grad_step, update)


grouped_steps_run = 0  # micro-batches the grouped step has run (tests, benchmarks)


def _grouped(step, model: nn.Module, loss_kw: dict, finish) -> Callable:
    """`step` for rows spread over CPU streams: each stream's row group runs its own compiled
    forward + backward (fused elementwise kernels, as in the reference forward), and the
    gradients are summed. Inside an eager value_and_grad MLX runs compiled pieces uncompiled
    (their inputs are tracers), so the eager step's forward was op by op; one whole-step
    trace instead leaves cores idle (bench/RESULTS.md). Given z (no gradient) the KTO loss
    is a mean of per-row terms, so with row group g of b_g rows out of B

        ∇ (1/B) Σ_i L_i = Σ_g ∇ (b_g / B) mean_{i in g} L_i.

    Falls back to `step` off the CPU streams. $MLX_KTO_GROUPED_STEP=0 turns it off."""
    state = [model.state, mx.random.state]

    def group_loss(model, tokens, mask, labels, ref, z, scale, head_start):
        pol = sequence_logps(model, tokens, mask, for_grad=True, head_start=head_start)
        loss, _ = kto_loss(pol, ref, None, None, labels, kl_reference_point=z, **loss_kw)
        return scale * loss, pol

    group_value_and_grad = nn.value_and_grad(model, group_loss)

    def make():
        @partial(mx.compile, inputs=state, outputs=state)
        def group(tokens, mask, labels, ref, z, scale, head_start):
            (_, pol), grad = group_value_and_grad(
                model, tokens, mask, labels, ref, z, scale, head_start
            )
            return pol, grad

        return group

    made: dict[tuple, Callable] = {}  # one trace cache per (stream, fastops mode)

    def grouped(tokens, mask, labels, ref, z, weight, head_start, prev_grad, do_update):
        B = tokens.shape[0]
        streams = row_streams()
        groups = row_groups(B)
        if len(groups) < 2:
            return step(tokens, mask, labels, ref, z, weight, head_start, prev_grad, do_update)
        global grouped_steps_run
        grouped_steps_run += 1
        pols, grad = [], None
        with rows_unsplit():
            for stream, (a, b) in zip(streams, groups):
                key = (repr(stream), fastops.active())
                if key not in made:
                    made[key] = make()
                with mx.stream(stream):
                    scale = weight * ((b - a) / B)  # [] float32
                    pol, g = made[key](
                        tokens[a:b], mask[a:b], labels[a:b], ref[a:b], z, scale, head_start
                    )
                pols.append(pol)
                grad = g if grad is None else tree_map(lambda x, y: x + y, grad, g)
        pol = mx.stop_gradient(mx.concatenate(pols))  # [B]
        _, metrics = kto_loss(pol, ref, None, None, labels, kl_reference_point=z, **loss_kw)
        return finish(grad, metrics, prev_grad, do_update)

    return grouped


def make_train_step(
    model: nn.Module, optimizer: optim.Optimizer, cfg: KTOConfig, desirable_weight: float
):
    """One micro-batch on its own, `train_step(batch, scorer, prev_grad, do_update) ->
    (loss, metrics, grad, norm)` (lazy; for benchmarks and tests): reference log-probs,
    the no-grad KL forward, z of this micro-batch alone, and the gradient pass weighted
    1 / grad_accumulation_steps. `train_loop` runs whole steps through `step.run_step`."""
    fns = make_step_fns(model, optimizer, cfg, desirable_weight)
    weight = mx.array(1.0 / cfg.grad_accumulation_steps, dtype=mx.float32)

    def train_step(batch: Batch, scorer: ReferenceScorer, prev_grad, do_update: bool):
        ref, ref_kl = scorer(batch)
        z = None
        if cfg.loss_type == "kto":
            kl_pol = fns.kl_forward(model, batch)
            mx.eval(kl_pol)  # on its own: see step.run_step
            diff = kl_pol.astype(mx.float32) - ref_kl.astype(mx.float32)
            z = mx.maximum(diff.mean(), 0.0)
        return fns.grad_step(batch, ref, z, weight, prev_grad, do_update)

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
    dist: Dist | None = None,
) -> dict:
    """Run optimizer steps state.step..n_steps; returns the last step's metrics.
    `probe(step, record, n_steps)` (judge.probes) may add diversity figures to a record;
    `callbacks` (a reporting.Callback) hears of every step, evaluation and save.
    With several ranks (`dist`), only rank 0 writes metrics, checkpoints and adapters."""
    from mlx_kto.model.load import save_adapter
    from mlx_kto.train.callbacks import Callback, ref_step_stats, show_bar, throughput

    cb = callbacks if callbacks is not None else Callback()

    dist = dist or Dist()
    with_kl = cfg.loss_type == "kto"
    fns = make_step_fns(model, optimizer, cfg, desirable_weight, dist)
    guard = guard or RunGuard(cfg, run_dir, log)

    metrics_log = None
    if dist.is_main:
        metrics_log = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=state.step)
    if is_paired(cfg):
        steps = iterate_pair_steps(train_rows, cfg, dist, state.epoch, state.batch, pad_id)
    else:
        steps = iterate_steps(
            train_rows,
            cfg,
            dist,
            start_epoch=state.epoch,
            start_batch=state.batch,
            pad_id=pad_id,
            with_kl=with_kl,
            min_size=_min_batch(cfg),
        )
    dist.hint = f"resume from the last checkpoint with --resume {run_dir}"
    bar = None
    if progress and not cfg.quiet and dist.is_main and show_bar():  # piped: plain lines
        from tqdm import tqdm

        bar = tqdm(total=n_steps, initial=state.step, desc="kto", dynamic_ncols=True, leave=True)

    model.train()
    last = {}
    mx.reset_peak_memory()
    t_window, tok_window, steps_window = time.perf_counter(), 0, 0
    per_epoch = batches_per_epoch(cfg, len(train_rows), dist.size, train_rows)
    epoch_ref = scorer.stats()
    while state.step < n_steps:
        guard.begin_step(model, optimizer, state)
        t0 = time.perf_counter()
        ref_s0, ref_before = scorer.seconds, scorer.stats()
        # Dropout randomness is a function of (seed, step, rank), so a resumed run replays it.
        mx.random.seed(cfg.seed * 1_000_003 + state.step + 7919 * dist.rank)
        data = next(steps)
        agg, norm, ntoks = run_step(data, scorer, fns, model, optimizer, cfg, dist, with_kl)
        state.epoch, state.batch = data.epoch, data.index + 1
        if data.index + 1 == per_epoch:  # an epoch ended: report its reference-pass work
            epoch_ref = _log_epoch_ref(data.epoch, scorer.stats(), epoch_ref, log, bar)
        skipped = guard.check(state.step + 1, agg["loss"], norm)  # raises Diverged if too many
        state.step += 1
        state.trained_tokens += ntoks
        dt = time.perf_counter() - t0
        tok_window, steps_window = tok_window + ntoks, steps_window + 1
        record = {
            "step": state.step,
            "epoch": round(state.epoch + state.batch / per_epoch, 4),  # fractional, as TRL
            **agg,
            "lr": float(optimizer.learning_rate),
            "grad_norm": norm,
            **({"skipped": True} if skipped else {}),
            "tokens": ntoks,
            "step_time": round(dt, 4),
            "tokens_per_sec": round(ntoks / dt, 1),
            "ref_time": round(scorer.seconds - ref_s0, 4),
            "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
            "num_tokens": state.trained_tokens,  # TRL's name: tokens trained on so far
            **ref_step_stats(ref_before, scorer.stats()),  # this step's, and `_total`s
        }
        if state.step % cfg.steps_per_report == 0 or state.step == n_steps:
            # TRL's logits/chosen, logits/rejected, entropy: an extra no-grad forward on the
            # step's last micro-batch, on reporting steps only (logit_stats.py)
            if data.batches and dist.is_main:
                b = data.batches[-1]
                record.update(logit_stats(model, b.tokens, b.mask, b.labels))
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
        if metrics_log is not None:
            metrics_log.write(record)
            cb.on_step(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_postfix(record), refresh=False)
        elif dist.is_main and (state.step % cfg.steps_per_report == 0 or state.step == n_steps):
            tput = throughput(tok_window, time.perf_counter() - t_window, steps_window)
            log(f"step {state.step}/{n_steps} {_postfix(record, tput)}")
            t_window, tok_window, steps_window = time.perf_counter(), 0, 0
        if (
            dist.is_main
            and cfg.steps_per_save
            and state.step % cfg.steps_per_save == 0
            and state.step < n_steps
        ):
            checkpoint_step(run_dir, state, model, optimizer, cfg, adapter_config, dist)
            save_adapter(model, run_dir, adapter_config)
            cb.on_save(state.step, run_dir)
        if guard.stop_requested:  # SIGINT / SIGTERM: the final checkpoint below, then exit
            break
    if bar is not None:
        bar.close()
    # The final state is always checkpointed so `--resume` can extend a finished run.
    if dist.is_main:
        checkpoint_step(run_dir, state, model, optimizer, cfg, adapter_config, dist)
        cb.on_save(state.step, run_dir)
        metrics_log.close()
    return last


def checkpoint_step(
    run_dir: Path, state: TrainState, model, optimizer, cfg: KTOConfig, adapter_config, dist=None
) -> None:
    """Checkpoint the last completed step (pruned to cfg.keep_checkpoints)."""
    save_checkpoint(
        run_dir,
        state.step,
        model,
        optimizer,
        _ckpt_state(state, cfg, dist),
        adapter_config,
        keep=cfg.keep_checkpoints,
    )


def _ckpt_state(state: TrainState, cfg: KTOConfig, dist: Dist | None = None) -> dict:
    return {
        "epoch": state.epoch,
        "batch": state.batch,  # next global batch (micro-batch x accumulation x ranks rows)
        "trained_tokens": state.trained_tokens,
        "seed": cfg.seed,
        "world_size": dist.size if dist else 1,
        "global_batch": global_batch_size(cfg, dist.size if dist else 1),
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
    parts = [f"loss {r['loss']:.4f}"] + ([f"kl {r['kl']:.3f}"] if "kl" in r else [])
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
        "rewards/accuracies",  # dpo/ipo (TRL DPOTrainer's name)
    )
    return f"eval @ {step}: " + " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev)
