"""DPO / IPO training on the KTO stack: optimizer steps of whole pairs, and the paired loss
of a micro-batch laid out [chosen_1..chosen_n, rejected_1..rejected_n] (pairs.py).

`--batch-size` counts pairs for these losses (TRL's DPOTrainer counts pairs too), so a
micro-batch holds 2 x batch_size sequences; there is no KL sequence (with_kl False). The
reference log-probs of both sides come from the same ReferenceScorer as KTO rows, so they
are cached by content like any row.
"""

from __future__ import annotations

from mlx_kto.data.batches import make_batch
from mlx_kto.data.pairs import find_pairs, num_pair_batches, pair_batch_order
from mlx_kto.errors import UserError
from mlx_kto.train.loss import PAIRED_LOSS_TYPES, dpo_loss
from mlx_kto.train.step import StepData, global_batch_size, split_global_batch

import mlx.core as mx


def is_paired(cfg) -> bool:
    return cfg.loss_type in PAIRED_LOSS_TYPES


def check_pairs(rows, name: str, loss_type: str = "dpo", log=print) -> list[tuple[int, int]]:
    """The pairs of a tokenized split; a one-line UserError when it has none, an unpaired row
    (find_pairs names it), or only pairs whose chosen equals its rejected: the paired losses
    learn from the difference of the two sides, so such a split would train nothing (and
    exit as if it had)."""
    pairs, broken = find_pairs(rows)
    if broken:
        log(
            f"warning: {name}: {broken} pairs lost one side in tokenization "
            "(prompt too long or empty completion) and are left out"
        )
    if not pairs:
        raise UserError(
            f"--data (data): {name} split has no complete (chosen, rejected) pair; "
            "--loss-type dpo/ipo needs prompt/chosen/rejected rows"
        )
    same = [c for c, r in pairs if rows[c].tokens == rows[r].tokens]
    if len(same) == len(pairs):
        raise UserError(
            f"--data (data): in every pair of the {name} split chosen equals rejected (e.g. "
            f"{rows[same[0]].where}); --loss-type {loss_type} learns from their difference, "
            "so nothing would be trained: check which columns hold chosen and rejected"
        )
    if same:
        log(
            f"warning: {name}: {len(same)} of {len(pairs)} pairs have chosen equal to rejected "
            f"(first: {rows[same[0]].where}); they teach nothing"
        )
    return pairs


def split_pairs(batch_rows: list[int], world: int, micro: int) -> list[list[list[int]]]:
    """[rank][micro-batch] -> row indices, each micro-batch [c_1..c_k, r_1..r_k], from one
    global batch [c_1..c_n, r_1..r_n]: pairs are sharded contiguously, near-equal per rank."""
    n = len(batch_rows) // 2
    pairs = list(zip(batch_rows[:n], batch_rows[n:]))  # [(c, r)] * n
    return [
        [[c for c, _ in m] + [r for _, r in m] for m in shard]
        for shard in split_global_batch(pairs, world, micro)
    ]


def iterate_pair_steps(rows, cfg, dist, start_epoch=0, start_batch=0, pad_id=0):
    """`step.iterate_steps` for paired losses: yield StepData of batch_size x accumulation x
    ranks pairs, forever, from a saved (epoch, global batch) position."""
    pairs = find_pairs(rows)[0]
    size = global_batch_size(cfg, dist.size)  # pairs per optimizer step
    epoch, b = start_epoch, start_batch
    while True:
        order = pair_batch_order(rows, pairs, size, cfg.seed, epoch, True)
        while b < len(order):
            shards = split_pairs(order[b], dist.size, cfg.batch_size)
            mine = [
                make_batch(rows, idx, cfg.pad_multiple, pad_id, False) for idx in shards[dist.rank]
            ]
            yield StepData(epoch, b, shards, mine)
            b += 1
        epoch, b = epoch + 1, 0


def pair_batches_per_epoch(rows, pairs_per_batch: int) -> int:
    return num_pair_batches(len(find_pairs(rows)[0]), pairs_per_batch)


def iterate_pair_batches(rows, pairs_per_batch: int, pad_multiple: int, pad_id: int):
    """Evaluation: every pair once, in data order, as micro-batches [c..., r...]."""
    pairs = find_pairs(rows)[0]
    for idx in pair_batch_order(rows, pairs, pairs_per_batch, 0, 0, shuffle=False):
        yield make_batch(rows, idx, pad_multiple, pad_id, False)


def paired_loss(policy_logps, ref_logps, mask, cfg) -> tuple[mx.array, dict]:
    """`loss.dpo_loss` of a micro-batch [chosen..., rejected...]: policy_logps, ref_logps [2n],
    mask [2n, T] (completion tokens, for IPO's per-token normalisation)."""
    n = policy_logps.shape[0] // 2
    ntok = mask.sum(axis=1)  # [2n]
    return dpo_loss(
        policy_logps[:n],
        policy_logps[n:],
        ref_logps[:n],
        ref_logps[n:],
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        chosen_tokens=ntok[:n],
        rejected_tokens=ntok[n:],
    )
