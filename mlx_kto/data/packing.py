"""Padding-free batches: a micro-batch's sequences laid end to end, one row per row stream.

A right-padded micro-batch computes B x T tokens for sum(len) real ones; with real feedback
(log-normal lengths) much of that is padding, for the policy, its KL sequences and the
reference alike. Packed, the sequences are laid end to end on R rows (R = the row streams
that run them side by side, balanced), each sequence a *segment* with its own positions
0..len-1, so the dense layers (projections, MLP, LM head) compute real tokens only, up to the
rounding of the row length. Attention runs per *pack*: consecutive sequences of a row that
fit in C positions (C = the longest sequence), gathered into [windows, C] (`win_idx`) with a
block-diagonal causal mask inside each window and scattered back (`inv`); RoPE turns by each
token's own position (model/packed.py). Every sequence computes exactly what it computes
alone. Per-sequence log-probs are the sums of their segment's target log-probs:

    seq_logp[b] = sum_{j : row[j] = b} log softmax(lm_head(h[pos[j]]))[ids[j]]

over the completion targets j of all rows, gathered before the LM head (no head work on
prompt or padding positions).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

TARGET_ALIGN = 16  # target slots per pack are padded to a multiple of this (fewer shapes)


@dataclass
class Packed:
    """Sequences packed without padding (host-built; see the module docstring): R rows of T
    positions, each row a run of packs end to end; each pack an attention window of at most
    C positions, gathered into [R, W, C] for attention (`win_idx`) and back (`inv`)."""

    tokens: mx.array  # [R, T] int32, pad_id after a row's last pack
    positions: mx.array  # [R, T] int32, position of each token inside its own sequence
    win_idx: mx.array  # [R, W, C] int32: row position of each window slot (unused: any)
    win_seg: mx.array  # [R, W, C] int32: its sequence in the row; unused slots: unique < 0
    inv: mx.array  # [R, T] int32: window slot (w * C + c) of each row position (padding: 0)
    tgt_pos: mx.array  # [R, M] int32: the position whose logits predict a completion token
    tgt_ids: mx.array  # [R, M] int32: that token
    tgt_row: mx.array  # [R, M] int32: its sequence (0..n_rows-1); -1 = an unused slot
    n_rows: int  # sequences packed
    pack_rows: list[list[int]]  # sequences of each row, in order
    real: int  # tokens of the sequences
    computed: int  # R x T: positions the dense layers compute

    def arrays(self) -> dict[str, mx.array]:
        """The arrays a (compiled) forward takes, as a dict (a pytree mx.compile accepts)."""
        names = ("tokens", "positions", "win_idx", "win_seg", "inv", "tgt_pos", "tgt_ids")
        return {k: getattr(self, k) for k in (*names, "tgt_row")}


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


def _balance(lengths: list[int], items, n: int) -> tuple[list[list[int]], list[int]]:
    """`items` onto n bins, longest first onto the lightest (ties by index): (bins, loads)."""
    bins: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        b = min(range(n), key=lambda b: (load[b], b))
        bins[b].append(i)
        load[b] += lengths[i]
    return bins, load


def plan_packs(lengths: list[int], pad_multiple: int = 16, lines: int = 1) -> list:
    """Where each sequence goes: rows -> packs (attention windows) -> sequence indices.
    Sequences onto `lines` rows, longest first onto the shortest row (rows of near-equal
    length: little padding at their ends); each row's sequences into packs of at most the
    longest sequence's length (rounded up to `pad_multiple`) by first-fit decreasing, which
    keeps attention's work (packs x capacity^2) small. Sequences keep input order in a pack."""
    if not lengths:
        return []
    cap = _round_up(max(lengths), pad_multiple)
    rows, _ = _balance(lengths, range(len(lengths)), min(lines, len(lengths)))
    plan = []
    for row in rows:
        packs = first_fit_decreasing([lengths[i] for i in row], cap)
        plan.append([sorted(row[j] for j in p) for p in packs])
    return plan


def pack_sequences(
    seqs: list[list[int]],
    starts: list[int],
    plan: list,
    pad_multiple: int = 16,
    pad_id: int = 0,
) -> Packed:
    """Lay `seqs` out as `plan` (rows -> packs -> sequences, from `plan_packs`), each row's
    packs end to end: sequence i's completion is seqs[i][starts[i]:]; its first token is
    never a target (nothing before it in its segment predicts it, as position 0 of a padded
    row). The plan may hold a subset of `seqs` (one pass, `pack_passes`): targets keep their
    sequence's index in `seqs`, so the per-sequence sums of a pass are 0 for the others."""
    lens = [len(s) for s in seqs]
    R = len(plan)
    T = _round_up(max(sum(lens[i] for p in row for i in p) for row in plan), pad_multiple)
    C = _round_up(max(sum(lens[i] for i in p) for row in plan for p in row), pad_multiple)
    W = max(len(row) for row in plan)
    tokens = np.full((R, T), pad_id, dtype=np.int32)  # [R, T]
    positions = np.zeros((R, T), dtype=np.int32)  # [R, T]
    inv = np.zeros((R, T), dtype=np.int32)  # [R, T]
    win_idx = np.zeros((R, W, C), dtype=np.int32)  # [R, W, C]
    win_seg = -1 - np.arange(W * C, dtype=np.int32).reshape(1, W, C).repeat(R, 0)  # [R, W, C]
    targets: list[list[tuple[int, int, int]]] = []  # per row: (position, token id, sequence)
    order: list[list[int]] = []
    for r, row in enumerate(plan):
        at, mine, seq = 0, [], []
        for w, pack in enumerate(row):
            win_idx[r, w] = at  # unused slots point at the window's first token
            for i in pack:
                s, k = seqs[i], at - win_idx[r, w, 0]  # k: offset inside the window
                tokens[r, at : at + len(s)] = s
                positions[r, at : at + len(s)] = np.arange(len(s))
                win_idx[r, w, k : k + len(s)] = np.arange(at, at + len(s))
                win_seg[r, w, k : k + len(s)] = len(seq)
                inv[r, at : at + len(s)] = w * C + np.arange(k, k + len(s))
                first = max(starts[i], 1)  # the target of position at + t - 1 is token t
                mine += [(at + t - 1, s[t], i) for t in range(first, len(s))]
                seq.append(i)
                at += len(s)
        targets.append(mine)
        order.append(seq)
    M = _round_up(max(1, max(len(t) for t in targets)), TARGET_ALIGN)
    tgt = np.zeros((3, R, M), dtype=np.int32)  # [3, R, M]: position, id, sequence
    tgt[2] = -1
    for r, mine in enumerate(targets):
        if mine:
            tgt[:, r, : len(mine)] = np.array(mine, dtype=np.int32).T
    arrays = [mx.array(a) for a in (tokens, positions, win_idx, win_seg, inv, *tgt)]
    real = sum(lens[i] for row in plan for pack in row for i in pack)
    return Packed(*arrays, len(seqs), order, real, R * T)


def pack_rows_of(
    seqs: list[list[int]],
    starts: list[int],
    pad_multiple: int = 16,
    pad_id: int = 0,
    groups: int = 1,
) -> Packed:
    """`plan_packs` then `pack_sequences` on `groups` rows: the packed form of `seqs`."""
    plan = plan_packs([len(s) for s in seqs], pad_multiple, groups)
    return pack_sequences(seqs, starts, plan, pad_multiple, pad_id)


def split_passes(lengths: list[int], budget: int) -> list[list[int]]:
    """Sequence indices in passes of at most `budget` tokens each (0 = one pass): a sequence
    longer than the budget alone, the others in as few passes as fit, near-equal in tokens
    (longest first onto the lightest pass; one more pass while one is over budget). Indices
    ascend inside a pass."""
    n_seq = len(lengths)
    if budget <= 0 or sum(lengths) <= budget or n_seq < 2:
        return [list(range(n_seq))]
    alone = [[i] for i in range(n_seq) if lengths[i] > budget]
    rest = [i for i in range(n_seq) if lengths[i] <= budget]
    n = -(-sum(lengths[i] for i in rest) // budget)
    while rest:
        passes, load = _balance(lengths, rest, n)
        if max(load) <= budget:
            break
        n += 1
    else:
        passes = []
    return sorted([sorted(p) for p in passes if p] + alone)


def plan_passes(lengths: list[int], budget: int, groups: int = 1) -> list[list[list[int]]]:
    """Passes -> pieces (one per row stream) -> sequence indices, each pass at most `budget`
    tokens (0 = one pass) or one sequence longer than that alone.

    The sequences go onto the `groups` streams first, longest first onto the lightest, so the
    streams' totals differ by at most one sequence; each stream's share is then cut into k
    near-equal pieces of at most budget / groups tokens (k: the fewest that fit every stream),
    and pass j runs the j-th longest piece of every stream. Cutting a pass into per-stream
    pieces after forming it (the first form) left one stream idle for 12% of a gradient
    pass on real rows, against 5% this way (bench/RESULTS.md). Pieces of a pass that would
    exceed the budget together (a sequence longer than budget / groups) get passes of
    their own. Indices ascend inside a piece."""
    n = len(lengths)
    if n == 0:
        return []
    if groups < 2 or n < 2:
        return [[p] for p in split_passes(lengths, budget)]
    streams, _ = _balance(lengths, range(n), min(groups, n))
    per = budget // len(streams) if budget > 0 else sum(lengths)
    k = max(len(split_passes([lengths[i] for i in s], per)) for s in streams)
    while True:
        cut = [_balance(lengths, s, min(k, len(s))) for s in streams]
        if all(len(p) < 2 or w <= per for bins, load in cut for p, w in zip(bins, load)):
            break
        k += 1
    pieces = [sorted(zip(load, bins), key=lambda x: (-x[0], min(x[1]))) for bins, load in cut]
    out = []
    for j in range(k):
        pass_ = [sorted(ps[j][1]) for ps in pieces if j < len(ps) and ps[j][1]]
        if budget <= 0 or sum(lengths[i] for p in pass_ for i in p) <= budget:
            out.append(pass_)
        else:
            out += [[p] for p in pass_]
    return out


def pack_passes(
    seqs: list[list[int]],
    starts: list[int],
    pad_multiple: int = 16,
    pad_id: int = 0,
    groups: int = 1,
    budget: int = 0,
) -> list[list[Packed]]:
    """The packed form of `seqs` in passes of at most `budget` tokens (`plan_passes`), each
    pass one single-row piece per row stream, each only as long as its own sequences (no
    row is padded to another's length). A pass is run and evaluated before the next, so a
    gradient pass holds the activations of `budget` tokens, not of the whole micro-batch."""
    lens = [len(s) for s in seqs]
    out = []
    for pieces in plan_passes(lens, budget, groups):
        out.append([])
        for idx in pieces:
            (row,) = plan_packs([lens[i] for i in idx], pad_multiple, 1)
            plan = [[[idx[j] for j in p] for p in row]]
            out[-1].append(pack_sequences(seqs, starts, plan, pad_multiple, pad_id))
    return out


def passes_computed(passes: list[list[Packed]]) -> int:
    """Token positions the dense layers compute over a packed micro-batch's passes."""
    return sum(piece.computed for pieces in passes for piece in pieces)
