"""Shuffled, length-bucketed micro-batches of (sequence, KL sequence) pairs.

Each row carries its own sequence (prompt + completion) and its KL sequence
(own prompt + the fixed partner's completion). Rows are shuffled each epoch,
then sorted by length inside windows of `bucket_window` batches so neighbours in
a batch have similar lengths (little padding) while batches still mix labels.
With `packing`, a batch also carries its sequences packed without padding
(data/packing.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mlx_kto.data.packing import Packed, pack_passes, passes_computed
from mlx_kto.runtime.streams import default_streams

import mlx.core as mx
import numpy as np

BUCKET_WINDOW = (
    16  # batches per sort window: big enough to cut padding, small enough to stay random
)
HEAD_ALIGN = 16  # head_start is rounded down to this: few distinct shapes for mx.compile
# Packed only when it computes at most this share of the padded tokens: on equal lengths the
# padded pass is as short and needs no per-token positions.
PACK_WORTH = 0.9


@dataclass
class Batch:
    tokens: mx.array  # [B, T] int32, right-padded
    mask: mx.array  # [B, T] bool, True where tokens[b, t] is a completion token
    kl_tokens: mx.array | None  # [B, Tk] int32: own prompt + partner's completion
    kl_mask: mx.array | None  # [B, Tk] bool
    labels: mx.array  # [B] bool, True = desirable
    index: list[int]  # row indices into the dataset
    ntoks: int  # real (non-padding) tokens of the main sequences
    # Target positions before this one (in tokens[:, 1:], the same for the KL sequences) hold
    # no completion token in any row: the LM head can skip them (a multiple of HEAD_ALIGN).
    head_start: int = 0
    # the sequences packed, or None: passes, each one single-row piece per row stream
    packed: list[list[Packed]] | None = None
    kl_packed: list[list[Packed]] | None = None  # the KL sequences, the same way

    @property
    def computed(self) -> int:
        """Token positions the policy's passes compute (main and KL; padding included)."""
        main = passes_computed(self.packed) if self.packed is not None else self.tokens.size
        kl = 0
        if self.kl_tokens is not None:
            kl = self.kl_tokens.size
            if self.kl_packed is not None:
                kl = passes_computed(self.kl_packed)
        return main + kl


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def _pack(seqs: list[list[int]], starts: list[int], pad_multiple: int, pad_id: int):
    """Right-pad token lists; mask marks positions >= the completion start."""
    T = _round_up(max(len(s) for s in seqs), pad_multiple)
    toks = np.full((len(seqs), T), pad_id, dtype=np.int32)  # [B, T]
    mask = np.zeros((len(seqs), T), dtype=bool)  # [B, T]
    for b, (s, start) in enumerate(zip(seqs, starts)):
        toks[b, : len(s)] = s
        mask[b, start : len(s)] = True
    return mx.array(toks), mx.array(mask)


def make_batch(
    rows,
    index: list[int],
    pad_multiple: int = 16,
    pad_id: int = 0,
    with_kl=True,
    packing: bool = False,
    pass_tokens: int = 0,
) -> Batch:
    """Collate rows[index] into a Batch (padding to a multiple limits compiled shapes). With
    `packing`, also the packed forms of its sequences and KL sequences, in passes of at most
    `pass_tokens` tokens (0 = one pass), each where `worth_packing`."""
    sel = [rows[i] for i in index]
    starts = [len(r.prompt_ids) for r in sel]
    packed = kl_packed = None
    if packing:
        groups = default_streams()  # packs run side by side on the row streams
        seqs = [r.tokens for r in sel]
        packed = pack_passes(seqs, starts, pad_multiple, pad_id, groups, pass_tokens)
        if with_kl:
            seqs = [r.kl_tokens for r in sel]
            kl_packed = pack_passes(seqs, starts, pad_multiple, pad_id, groups, pass_tokens)
    tokens, mask = _pack([r.tokens for r in sel], starts, pad_multiple, pad_id)
    kl_tokens = kl_mask = None
    if with_kl:
        kl_tokens, kl_mask = _pack([r.kl_tokens for r in sel], starts, pad_multiple, pad_id)
    labels = mx.array([bool(r.label) for r in sel])
    ntoks = sum(len(r.tokens) for r in sel)
    # The first completion token at position s is the target of position s - 1.
    head_start = max(0, min(starts) - 1) // HEAD_ALIGN * HEAD_ALIGN
    if not worth_packing(packed, tokens):
        packed = None
    if not worth_packing(kl_packed, kl_tokens):
        kl_packed = None
    return Batch(
        tokens, mask, kl_tokens, kl_mask, labels, list(index), ntoks, head_start, packed, kl_packed
    )


def worth_packing(passes: list[list[Packed]] | None, padded: mx.array | None) -> bool:
    """Run the packed form: it saves padding (PACK_WORTH), or it runs in several passes (the
    padded micro-batch would hold every sequence's activations at once)."""
    if passes is None:
        return False
    return len(passes) > 1 or passes_computed(passes) <= PACK_WORTH * padded.size


def _length(row) -> int:
    return max(len(row.tokens), len(row.kl_tokens) if row.kl_completion_ids else 0)


def batch_order(
    rows, batch_size: int, seed: int, epoch: int, shuffle: bool = True, min_size: int = 2
) -> list[list[int]]:
    """Row indices of each micro-batch for one epoch (deterministic in seed, epoch).

    A trailing partial batch smaller than `min_size` is merged into the previous
    one (a KTO micro-batch of one row has no KL partner to compare against)."""
    idx = list(range(len(rows)))
    rng = random.Random(f"{seed}:{epoch}")
    if shuffle:
        rng.shuffle(idx)
        window = batch_size * BUCKET_WINDOW
        idx = [
            i
            for w in range(0, len(idx), window)
            for i in sorted(idx[w : w + window], key=lambda i: _length(rows[i]))
        ]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        batches[-2].extend(batches.pop())
    if shuffle:
        rng.shuffle(batches)
    return batches


def iterate_batches(
    rows,
    batch_size: int,
    seed: int = 0,
    start_epoch: int = 0,
    start_batch: int = 0,
    shuffle: bool = True,
    pad_multiple: int = 16,
    pad_id: int = 0,
    with_kl: bool = True,
    min_size: int = 2,
    loop: bool = True,
    packing: bool = False,
    pass_tokens: int = 0,
):
    """Yield (epoch, batch_index, Batch) forever (or one pass when loop=False),
    starting at a saved data position."""
    epoch, b = start_epoch, start_batch
    while True:
        order = batch_order(rows, batch_size, seed, epoch, shuffle, min_size)
        while b < len(order):
            yield (
                epoch,
                b,
                make_batch(rows, order[b], pad_multiple, pad_id, with_kl, packing, pass_tokens),
            )
            b += 1
        if not loop:
            return
        epoch, b = epoch + 1, 0


def num_batches(n_rows: int, batch_size: int, min_size: int = 2) -> int:
    """Micro-batches per epoch, as batch_order builds them."""
    n = -(-n_rows // batch_size)
    if n > 1 and n_rows % batch_size and n_rows % batch_size < min_size:
        n -= 1
    return n
