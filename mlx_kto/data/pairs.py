"""Paired rows for the DPO baseline: which tokenized rows form a (chosen, rejected) pair, and
shuffled, length-bucketed micro-batches of whole pairs.

A paired data row ({"prompt", "chosen", "rejected"}) becomes two unpaired rows that share its
location (`where`, "path:line"); KTO trains on them as they are. DPO needs them together: a
micro-batch of n pairs is laid out [chosen_1..chosen_n, rejected_1..rejected_n] (TRL's
`DPOTrainer` concatenates the same way), so the loss splits its log-probs in halves.
"""

from __future__ import annotations

import random

from mlx_kto.data.batches import BUCKET_WINDOW
from mlx_kto.errors import UserError


def find_pairs(rows) -> tuple[list[tuple[int, int]], int]:
    """[(chosen_index, rejected_index)] in row order, and the number of paired source rows
    that lost one side in tokenization (dropped: prompt too long, empty completion).

    Rows must come from paired data: a pair is the two sides of one prompt/chosen/rejected
    row (`paired`, sharing its `where`), its two sides after the same prompt tokens (one
    split point: data.tokenize). Anything else (an unpaired row, a location with other than
    one desirable and one undesirable row, per-message labels: replies to different prompts)
    is a user error naming the row."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.where, []).append(i)
    pairs, broken = [], 0
    for where, idx in groups.items():
        labels = [bool(rows[i].label) for i in idx]
        from_pair = all(getattr(rows[i], "paired", True) for i in idx)
        if from_pair and len(idx) == 2 and sorted(labels) == [False, True]:
            c, r = (idx[0], idx[1]) if labels[0] else (idx[1], idx[0])
            _check_same_prompt(rows[c], rows[r], where)
            pairs.append((c, r))
        elif from_pair and len(idx) == 1:
            broken += 1
        else:
            raise UserError(
                f"{where}: loss_type dpo/ipo needs paired rows (prompt/chosen/rejected); "
                "this row is not a pair (use --loss-type kto for unpaired thumbs up/down)"
            )
    pairs.sort(key=lambda p: min(p))
    return pairs, broken


def _check_same_prompt(chosen, rejected, where: str) -> None:
    """The two sides of a pair answer one prompt (tokenize.py splits a pair at one point)."""
    a, b = getattr(chosen, "prompt_ids", None), getattr(rejected, "prompt_ids", None)
    if a != b:
        raise UserError(
            f"{where}: the chosen and rejected replies of this pair do not share their prompt "
            "tokens; DPO compares two replies to the same prompt"
        )


def pair_batch_order(
    rows, pairs: list[tuple[int, int]], pairs_per_batch: int, seed: int, epoch: int, shuffle=True
) -> list[list[int]]:
    """Row indices of each DPO micro-batch for one epoch: n pairs as [c_1..c_n, r_1..r_n].
    Deterministic in (seed, epoch); pairs shuffled, then sorted by their longer side inside
    windows of BUCKET_WINDOW batches (little padding, still random)."""
    order = list(range(len(pairs)))
    rng = random.Random(f"pairs:{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
        window = pairs_per_batch * BUCKET_WINDOW

        def length(p: int) -> int:
            c, r = pairs[p]
            return max(len(rows[c].tokens), len(rows[r].tokens))

        order = [
            p
            for w in range(0, len(order), window)
            for p in sorted(order[w : w + window], key=length)
        ]
    groups = [order[i : i + pairs_per_batch] for i in range(0, len(order), pairs_per_batch)]
    if shuffle:
        rng.shuffle(groups)
    return [[pairs[p][0] for p in g] + [pairs[p][1] for p in g] for g in groups]


def num_pair_batches(n_pairs: int, pairs_per_batch: int) -> int:
    """DPO micro-batches per epoch (a last partial batch of one pair is a valid batch)."""
    return -(-n_pairs // pairs_per_batch)
