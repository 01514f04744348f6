"""The compiled pieces of one optimizer step (what `step.run_step` calls): the policy's
no-grad KL forward, the weighted gradient pass with the update on the last micro-batch, and
on CPU streams one compiled forward + backward per stream's rows (`_grouped`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import Batch
from mlx_kto.model.logprobs import compiled_sequence_logps, sequence_logps
from mlx_kto.reference.scorer import ReferenceScorer
from mlx_kto.runtime import traces
from mlx_kto.runtime.streams import active_streams, row_groups, row_streams, rows_unsplit
from mlx_kto.runtime.switches import GROUPED_STEP
from mlx_kto.train import packed_step
from mlx_kto.train.distributed import Dist, sum_gradients
from mlx_kto.train.dpo import is_paired, paired_loss
from mlx_kto.train.guard import keep_finite_update
from mlx_kto.train.loss import kto_loss

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map


def loss_kwargs(cfg: KTOConfig, desirable_weight: float) -> dict:
    """kto_loss's keyword arguments from the config (desirable_weight resolved)."""
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
    loss_kw = loss_kwargs(cfg, desirable_weight)
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

        compiled_step = traces.bounded(make_compiled)

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

    group = traces.bounded(make)  # per (stream, fastops mode, shape)

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
                with mx.stream(stream):
                    scale = weight * ((b - a) / B)  # [] float32
                    pol, g = group(
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
