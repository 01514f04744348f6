"""Pairing tokenized rows for DPO and batching whole pairs."""

from dataclasses import dataclass

import mlx_kto  # noqa: F401
from mlx_kto.data.pairs import find_pairs, num_pair_batches, pair_batch_order
from mlx_kto.errors import UserError

import pytest


@dataclass
class R:
    where: str
    label: bool
    n: int = 3

    @property
    def tokens(self):
        return list(range(self.n))


def rows_of(k, missing=()):
    rows = []
    for i in range(k):
        for lab in (False, True) if i % 2 else (True, False):
            if (i, lab) not in missing:
                rows.append(R(f"f:{i + 1}", lab, n=2 + i))
    return rows


def test_find_pairs_orders_chosen_first_and_counts_broken():
    rows = rows_of(4, missing={(2, False)})
    pairs, broken = find_pairs(rows)
    assert broken == 1 and len(pairs) == 3
    for c, r in pairs:
        assert rows[c].label and not rows[r].label and rows[c].where == rows[r].where


def test_unpaired_rows_are_refused_by_location():
    rows = rows_of(2) + [R("g:7", True), R("g:7", True)]
    with pytest.raises(UserError, match="g:7: loss_type dpo"):
        find_pairs(rows)


def test_pair_batches_cover_every_pair_once_and_are_deterministic():
    rows = rows_of(37)
    pairs, _ = find_pairs(rows)
    order = pair_batch_order(rows, pairs, 4, seed=3, epoch=0)
    assert order == pair_batch_order(rows, pairs, 4, seed=3, epoch=0)
    assert order != pair_batch_order(rows, pairs, 4, seed=3, epoch=1)
    assert len(order) == num_pair_batches(len(pairs), 4)
    seen = []
    for batch in order:
        n = len(batch) // 2
        assert len(batch) == 2 * n
        for c, r in zip(batch[:n], batch[n:]):
            assert (c, r) in pairs
            seen.append((c, r))
    assert sorted(seen) == sorted(pairs)
