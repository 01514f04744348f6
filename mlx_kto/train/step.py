"""One optimizer step over a global batch: its micro-batches, its KL reference point, its update.

The data order is one of *global batches* of `batch_size x grad_accumulation_steps x ranks`
rows (`batches.batch_order` with that size), so it does not depend on how a step is split:
micro-batch 1 x accumulation 8, micro-batch 8 x 1 and 2 ranks x 4 rows read the same rows in
the same steps. Each rank takes its contiguous shard of a global batch (rows are sorted by
length inside it, so neighbours pad little) and cuts it into micro-batches of at most
`batch_size` rows.

KTO's reference point has no gradient (kto-spec.md 2.4), so a step runs in two phases:

1. every micro-batch's reference log-probs (cache or forward) and the policy's no-grad KL
   forward; then z over the step's rows, summed over ranks:
       kl_estimate=step:         z = max(0, Σ_{all rows of the step} (KL_logp − ref_KL_logp) / N)
       kl_estimate=micro_batch:  z_k = the same over the k-th micro-batch of every rank (TRL)
2. the gradient passes with that z, each micro-batch weighted by its rows,
       g = Σ_k (n_k / N) ∇ mean_k(L) = ∇ (1/N) Σ_i L_i,      N = rows of the global batch,
   summed over ranks, then clipping and AdamW: the update of one batch of N rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_kto.data.batches import Batch, batch_order, make_batch
from mlx_kto.train.distributed import Dist, all_sum, collective, reduce_metrics
from mlx_kto.train.loss import merge_metrics, metrics_to_floats

import mlx.core as mx
from mlx.utils import tree_map


@dataclass
class StepData:
    """One global batch as this rank sees it."""

    epoch: int
    index: int  # global batch index inside the epoch
    shards: list[list[list[int]]]  # [rank][micro-batch] -> row indices (every rank's plan)
    batches: list[Batch]  # this rank's micro-batches

    @property
    def rows(self) -> int:
        return sum(len(m) for shard in self.shards for m in shard)


def split_global_batch(index: list[int], world: int, micro: int) -> list[list[list[int]]]:
    """Contiguous, near-equal shards (the first n % world ranks get one row more), each cut
    into micro-batches of at most `micro` rows. A rank may get none in a short last batch."""
    n = len(index)
    shards, start = [], 0
    for r in range(world):
        size = n // world + (1 if r < n % world else 0)
        shard = index[start : start + size]
        start += size
        shards.append([shard[i : i + micro] for i in range(0, len(shard), micro)])
    return shards


def global_batch_size(cfg, world: int) -> int:
    return cfg.batch_size * cfg.grad_accumulation_steps * world


def iterate_steps(
    rows,
    cfg,
    dist: Dist,
    start_epoch: int = 0,
    start_batch: int = 0,
    pad_id: int = 0,
    with_kl: bool = True,
    min_size: int = 2,
):
    """Yield StepData forever, from a saved (epoch, global batch) position."""
    size = global_batch_size(cfg, dist.size)
    epoch, b = start_epoch, start_batch
    while True:
        order = batch_order(rows, size, cfg.seed, epoch, True, min_size)
        while b < len(order):
            shards = split_global_batch(order[b], dist.size, cfg.batch_size)
            mine = [
                make_batch(
                    rows, idx, cfg.pad_multiple, pad_id, with_kl, cfg.packing, cfg.pass_budget
                )
                for idx in shards[dist.rank]
            ]
            yield StepData(epoch, b, shards, mine)
            b += 1
        epoch, b = epoch + 1, 0


@dataclass
class _Prepared:
    batch: Batch
    ref: mx.array  # [B] reference log-probs of the main sequences
    kl_diff: mx.array | None  # [B] policy − reference KL-sequence log-probs (no gradient)


def kl_reference_points(
    prepared: list[_Prepared], data: StepData, mode: str, dist: Dist
) -> list[mx.array]:
    """z for each of this rank's micro-batches (see the module docstring).

    Alone, z = max(0, mean(concatenated KL log-ratios)): for one micro-batch exactly what
    `kto_loss` computes. With ranks, Σ and row counts are summed over ranks (all_sum)."""
    slots = 1 if mode == "step" else max(len(s) for s in data.shards)
    slot_of = (lambda k: 0) if mode == "step" else (lambda k: k)  # noqa: E731
    if dist.group is None:
        groups: list[list[mx.array]] = [[] for _ in range(slots)]
        for k, p in enumerate(prepared):
            groups[slot_of(k)].append(p.kl_diff)
        z = [mx.maximum(mx.concatenate(g).mean(), 0.0) if g else mx.array(0.0) for g in groups]
    else:
        rows = [0] * slots  # global rows per slot: every rank knows every rank's plan
        for shard in data.shards:
            for k, m in enumerate(shard):
                rows[slot_of(k)] += len(m)
        local = [mx.array(0.0)] * slots
        for k, p in enumerate(prepared):
            local[slot_of(k)] = local[slot_of(k)] + p.kl_diff.sum()
        sums = all_sum(mx.stack(local), dist)  # [slots]
        z_all = mx.maximum(sums / mx.array([max(r, 1) for r in rows], dtype=mx.float32), 0.0)
        with collective(dist, "KL reference point"):
            mx.eval(z_all)
        z = [z_all[s] for s in range(slots)]
    return [z[slot_of(k)] for k in range(len(prepared))]


def run_step(
    data: StepData,
    scorer,
    fns,
    model,
    optimizer,
    cfg,
    dist: Dist,
    with_kl: bool,
) -> tuple[dict, float, int]:
    """Both phases of one optimizer step; returns (metrics over the global batch, grad norm,
    tokens of the global batch). `fns` is trainer.StepFns (kl_forward, grad_step, update)."""
    prepared = []
    for batch in data.batches:  # phase 1: references and the no-grad KL forwards
        ref, ref_kl = scorer(batch)
        kl_diff = None
        if with_kl:
            kl_pol = fns.kl_forward(model, batch)
            # Evaluated on its own: left lazy, MLX interleaves it with the policy's forward,
            # more activations live at once, and the step is ~25% slower on CPU.
            mx.eval(kl_pol)
            kl_diff = kl_pol.astype(mx.float32) - ref_kl.astype(mx.float32)
        prepared.append(_Prepared(batch, ref, kl_diff))
    zs = kl_reference_points(prepared, data, cfg.kl_estimate, dist) if with_kl else None

    total = data.rows
    state = [model.trainable_parameters(), optimizer.state]
    agg, grad, norm, ntoks = None, None, mx.array(0.0), 0
    for k, p in enumerate(prepared):  # phase 2: gradient passes, the update on the last
        last = k == len(prepared) - 1
        weight = mx.array(len(p.batch.index) / total, dtype=mx.float32)
        z = zs[k] if zs is not None else None
        loss, metrics, grad, norm = fns.grad_step(p.batch, p.ref, z, weight, grad, last)
        if last:
            with collective(dist, "averaging gradients"):
                mx.eval(loss, metrics, grad, norm, *state)
        else:
            mx.eval(loss, metrics, grad, norm, *state)
        m = metrics_to_floats(metrics)
        agg = m if agg is None else merge_metrics(agg, m)
        ntoks += p.batch.ntoks
    if not prepared:  # a short last batch left this rank no rows: it still joins the sums
        norm = fns.update(tree_map(mx.zeros_like, model.trainable_parameters()))
        with collective(dist, "averaging gradients"):
            mx.eval(norm, *state)
    agg, ntoks = reduce_metrics(agg or {}, ntoks, dist)
    return agg, float(norm), ntoks
