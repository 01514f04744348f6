"""The policy's passes on packed micro-batches (data/packing.py, model/packed.py): its KL
forward and its gradient pass, with the padded passes' results (tests/test_packing.py).

`wrap` hands `make_step_fns` a KL forward and a gradient pass that take a batch's packed form
when it has one (and the model packs), and the padded functions otherwise. The gradient pass
mirrors the grouped step of train/loop.py: on CPU row streams each stream's packed rows run
their own compiled forward + backward, and with z fixed the KTO loss is a mean of per-sequence
terms, so with the sequences of group g out of B

    ∇ (1/B) Σ_i L_i = Σ_g ∇ (|g| / B) mean_{i in g} L_i,

where g runs over the row streams' shares of each pass (data/packing.py `pack_passes`): the
passes run one after another, each evaluated before the next, so a step holds the
activations of one pass (--pass-tokens), not of the whole micro-batch. A packed row holds
whole sequences (one never spans two rows), gathered from the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from mlx_kto.data.batches import Batch
from mlx_kto.data.packing import Packed
from mlx_kto.model.packed import can_pack, compiled_packed_logps, packed_sequence_logps
from mlx_kto.runtime import traces
from mlx_kto.runtime.streams import row_streams, rows_unsplit
from mlx_kto.train.loss import kto_loss

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map


def _sub(pk: dict, rows: list[int], n_rows: int) -> dict:
    """A piece's arrays, its target rows renumbered 0..len(rows)-1 in `rows` order."""
    local = np.full(n_rows + 1, -1, dtype=np.int32)  # [n_rows + 1]: slot -1 stays -1
    local[rows] = np.arange(len(rows))
    out = dict(pk)
    out["tgt_row"] = mx.array(local[np.array(out["tgt_row"])])  # [1, M]
    return out


def passes_logps(logps: Callable, passes: list[list[Packed]]) -> mx.array:
    """Per-sequence log-probs [n_rows] of packed passes, no gradient: `logps(pieces, n_rows)`
    per pass (0 for the sequences of other passes), summed; each pass evaluated before the
    next but the last (its activations freed before the next pass's are made)."""
    out = None
    for k, pieces in enumerate(passes):
        part = logps([p.arrays() for p in pieces], pieces[0].n_rows)  # [n_rows]
        out = part if out is None else out + part
        if k < len(passes) - 1:
            mx.eval(out)
    return out


def packed_grad_step(model: nn.Module, loss_kw: dict, finish: Callable, compiled: bool):
    """`step(passes, labels, ref, z, weight, prev_grad, do_update) -> (loss, metrics, grad,
    norm)`: the packed twin of loop.py's grouped step, pass by pass (data/packing.py
    `pack_passes`: each pass's gradient evaluated before the next pass runs); `finish`
    accumulates and updates."""
    state = [model.state, mx.random.state]

    def group_loss(model, pk, n_rows, labels, ref, z, scale):
        pol = packed_sequence_logps(model, pk, n_rows, for_grad=True)
        loss, _ = kto_loss(pol, ref, None, None, labels, kl_reference_point=z, **loss_kw)
        return scale * loss, pol

    value_and_grad = nn.value_and_grad(model, group_loss)

    def eager(pk, n_rows, labels, ref, z, scale):
        (_, pol), grad = value_and_grad(model, pk, n_rows, labels, ref, z, scale)
        return pol, grad

    # one trace per (stream, fastops mode, shape), the least recently used dropped
    traced = traces.bounded(
        lambda: partial(mx.compile, inputs=state, outputs=state)(lambda *a: eager(*a))
    )
    group_fn = traced if compiled else eager

    def run_pass(pieces: list[Packed], labels, ref, z, weight, split: bool):
        """(per-sequence log-probs of the pass's sequences, their batch rows, gradient): each
        piece on its own row stream, with its own compiled forward + backward."""
        B = pieces[0].n_rows
        default = mx.default_stream(mx.default_device())
        if len(pieces) == 1 and not split:
            pol, grad = group_fn(pieces[0].arrays(), B, labels, ref, z, weight)
            return pol, list(range(B)), grad
        streams = row_streams() or [default]
        pols, grad, order = [], None, []
        with rows_unsplit():
            for k, piece in enumerate(pieces):
                rows = [r for rs in piece.pack_rows for r in rs]
                idx = mx.array(rows)
                stream = streams[k % len(streams)]
                with mx.stream(stream):
                    scale = weight * (len(rows) / B)  # [] float32
                    pol, g = group_fn(
                        _sub(piece.arrays(), rows, B), len(rows), labels[idx], ref[idx], z, scale
                    )
                pols.append(pol)
                order += rows
                grad = g if grad is None else tree_map(lambda x, y: x + y, grad, g)
        return mx.concatenate(pols), order, grad

    def step(passes: list[list[Packed]], labels, ref, z, weight, prev_grad, do_update: bool):
        pols, order, grad = [], [], None
        for pieces in passes:
            pol, rows, g = run_pass(pieces, labels, ref, z, weight, len(passes) > 1)
            grad = g if grad is None else tree_map(lambda x, y: x + y, grad, g)
            pols.append(pol)
            order += rows
            # One pass's activations alive at a time; the last pass's gradient too before the
            # update, which evaluated with the backward keeps every checkpointed block's
            # activations alive (--grad-checkpoint on SmolLM2, 1008 tokens: 1273 MB vs 513 MB).
            mx.eval(grad, pols)
        back = mx.array(np.argsort(order))  # rows back in batch order
        pol = mx.stop_gradient(mx.concatenate(pols)[back])  # [B]
        _, metrics = kto_loss(pol, ref, None, None, labels, kl_reference_point=z, **loss_kw)
        return finish(grad, metrics, prev_grad, do_update)

    return step


def wrap(model: nn.Module, cfg, loss_kw: dict, finish: Callable, kl_forward, grad_step):
    """(kl_forward, grad_step) of `make_step_fns` that run a batch's packed forms when it has
    them and the model packs (model/packed.py), else the padded functions given. The compiled
    KL forward is traced in train mode: for the training loop only (as loop.py's)."""
    if not can_pack(model):
        return kl_forward, grad_step
    if cfg.compile:
        kl_logps = compiled_packed_logps(model)
    else:
        kl_logps = partial(packed_sequence_logps, model)
    step = packed_grad_step(model, loss_kw, finish, cfg.compile)

    def packed_kl_forward(model_, batch: Batch) -> mx.array | None:
        if batch.kl_packed is None:
            return kl_forward(model_, batch)
        return mx.stop_gradient(passes_logps(kl_logps, batch.kl_packed))

    def packed_grad(batch: Batch, ref, z, weight, prev_grad, do_update: bool):
        if batch.packed is None:
            return grad_step(batch, ref, z, weight, prev_grad, do_update)
        return step(batch.packed, batch.labels, ref, z, weight, prev_grad, do_update)

    return packed_kl_forward, packed_grad
