"""Padding-free batches: several sequences packed into each row of a [P, N] array.

A right-padded micro-batch computes B x T tokens for sum(len) real ones; with real feedback
(log-normal lengths) most of that is padding, for the policy, its KL sequences and the
reference alike. Packed, the B sequences are laid end to end into P "packs" of N positions,
each sequence a *segment* with its own positions 0..len-1; attention stays inside a segment
(a block-diagonal causal mask, model/packed.py) and RoPE turns by each token's own position,
so every sequence computes exactly what it computes alone. Per-sequence log-probs are the
sums of their segment's target log-probs:

    seq_logp[b] = sum_{j : row[j] = b} log softmax(lm_head(h[pos[j]]))[ids[j]]

over the completion targets j of all packs, gathered before the LM head (no head work on
prompt or padding positions).

Which sequences share a pack: first-fit decreasing into packs of capacity N, trying the
capacities that fit the sequences into 1..B packs and keeping the cheapest by `pack_cost`
(computed tokens, plus attention's share, which grows with N, plus idle row streams).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

# Pack length at which attention's work per token about equals the dense layers' (~4 N d
# against ~2 x 12 d^2 for a llama block of width d ~ 500-900); it weighs the cost model only.
ATTENTION_TOKENS = 2048
MAX_PACK = 2048  # no pack longer than this unless one sequence is (attention is N^2 memory)
TARGET_ALIGN = 16  # target slots per pack are padded to a multiple of this (fewer shapes)


@dataclass
class Packed:
    """Sequences packed into P rows of N positions (host-built; see the module docstring)."""

    tokens: mx.array  # [P, N] int32, pad_id after the last segment of a pack
    positions: mx.array  # [P, N] int32, position of each token inside its own sequence
    segments: mx.array  # [P, N] int32, segment of each token in its pack (padding: its own)
    tgt_pos: mx.array  # [P, M] int32: the position whose logits predict a completion token
    tgt_ids: mx.array  # [P, M] int32: that token
    tgt_row: mx.array  # [P, M] int32: its sequence (0..n_rows-1); -1 = an unused slot
    n_rows: int  # sequences packed
    pack_rows: list[list[int]]  # sequences of each pack, in order
    real: int  # tokens of the sequences
    computed: int  # P x N

    def arrays(self) -> dict[str, mx.array]:
        """The arrays a (compiled) forward takes, as a dict (a pytree mx.compile accepts)."""
        return {
            "tokens": self.tokens,
            "positions": self.positions,
            "segments": self.segments,
            "tgt_pos": self.tgt_pos,
            "tgt_ids": self.tgt_ids,
            "tgt_row": self.tgt_row,
        }


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in packs of at most `capacity`, longest first into the first pack
    with room (ties broken by index, so the result is deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for p, r in enumerate(room):
            if lengths[i] <= r:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(capacity - lengths[i])
    return packs


def pack_cost(n_packs: int, capacity: int, groups: int = 1) -> float:
    """Relative cost of a [n_packs, capacity] pass: computed tokens, each dearer by attention's
    share (capacity / ATTENTION_TOKENS), with the pack count rounded up to a multiple of the
    row streams (`groups`) that run the packs side by side (an idle stream is lost time)."""
    slots = math.ceil(n_packs / max(groups, 1)) * max(groups, 1)
    return slots * capacity * (1.0 + capacity / ATTENTION_TOKENS)


def plan_packs(lengths: list[int], pad_multiple: int = 16, groups: int = 1) -> list[list[int]]:
    """Which sequences share a pack: first-fit decreasing at each candidate capacity (the
    smallest multiple of `pad_multiple` holding the sequences in P packs, P = 1..len, and a
    few steps above each; never below the longest sequence, nor above MAX_PACK unless one
    sequence is longer); the cheapest result by `pack_cost` wins. Packs are returned longest
    first, their sequences in input order."""
    if not lengths:
        return []
    longest = _round_up(max(lengths), pad_multiple)
    limit = max(longest, MAX_PACK)
    total = sum(lengths)
    caps = {
        max(longest, _round_up(-(-total // n), pad_multiple)) for n in range(1, len(lengths) + 1)
    }
    caps = {c + k * pad_multiple for c in caps for k in range(4)}
    best: tuple[float, int, list[list[int]]] | None = None
    for cap in sorted(c for c in caps if c <= limit):
        packs = first_fit_decreasing(lengths, cap)
        cost = pack_cost(len(packs), cap, groups)
        if best is None or cost < best[0]:
            best = (cost, cap, packs)
    assert best is not None  # `longest` itself is always a candidate
    packs = [sorted(p) for p in best[2]]
    packs.sort(key=lambda p: (-sum(lengths[i] for i in p), p[0]))
    return packs


def pack_sequences(
    seqs: list[list[int]],
    starts: list[int],
    packs: list[list[int]],
    pad_multiple: int = 16,
    pad_id: int = 0,
) -> Packed:
    """Lay `seqs` out as `packs` (from `plan_packs`): sequence i's completion is
    seqs[i][starts[i]:]; its first token is never a target (nothing before it in its
    segment predicts it, as position 0 of a padded row)."""
    P = len(packs)
    lens = [len(s) for s in seqs]
    N = _round_up(max(sum(lens[i] for i in p) for p in packs), pad_multiple)
    tokens = np.full((P, N), pad_id, dtype=np.int32)  # [P, N]
    positions = np.zeros((P, N), dtype=np.int32)  # [P, N]
    segments = np.zeros((P, N), dtype=np.int32)  # [P, N]
    targets: list[list[tuple[int, int, int]]] = []  # per pack: (position, token id, row)
    for p, rows in enumerate(packs):
        at, mine = 0, []
        for k, i in enumerate(rows):
            s = seqs[i]
            tokens[p, at : at + len(s)] = s
            positions[p, at : at + len(s)] = np.arange(len(s))
            segments[p, at : at + len(s)] = k
            first = max(starts[i], 1)  # the target of position at + t - 1 is token t
            mine += [(at + t - 1, s[t], i) for t in range(first, len(s))]
            at += len(s)
        segments[p, at:] = len(rows)  # padding: a segment of its own (never all-masked)
        positions[p, at:] = np.arange(N - at)
        targets.append(mine)
    M = _round_up(max(1, max(len(t) for t in targets)), TARGET_ALIGN)
    tgt = np.zeros((3, P, M), dtype=np.int32)  # [3, P, M]: position, id, row
    tgt[2] = -1
    for p, mine in enumerate(targets):
        if mine:
            tgt[:, p, : len(mine)] = np.array(mine, dtype=np.int32).T
    return Packed(
        mx.array(tokens),
        mx.array(positions),
        mx.array(segments),
        mx.array(tgt[0]),
        mx.array(tgt[1]),
        mx.array(tgt[2]),
        len(seqs),
        [list(p) for p in packs],
        sum(lens),
        P * N,
    )


def pack_rows_of(
    seqs: list[list[int]],
    starts: list[int],
    pad_multiple: int = 16,
    pad_id: int = 0,
    groups: int = 1,
) -> Packed:
    """`plan_packs` then `pack_sequences`: the packed form of `seqs`."""
    packs = plan_packs([len(s) for s in seqs], pad_multiple, groups)
    return pack_sequences(seqs, starts, packs, pad_multiple, pad_id)
