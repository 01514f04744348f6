"""Reference log-probabilities: the policy's own weights with the adapter off, cached on disk.

Everything that needs reference log-probs goes through `ReferenceScorer`. With a `RefCache`
it is lazy: each sequence (a row's own one and its KL one) is looked up by content,

    key = blake2b(reference fingerprint, completion start, token ids up to the completion end)

and only the misses are computed, packed into one batched adapter-off forward, stored (one
transaction per call) and returned. A call with no misses runs no forward at all, so later
epochs, resumed runs, evaluation and sweeps over beta / learning rate / weights cost no
reference compute. Nothing positional (row index, batch, seed) is in a key, so no change of
data, order, batch size or seed can read a wrong value. See `fingerprint.py` for what the
fingerprint covers.
Storage is `refcache.RefCache` (SQLite). With `packing` (and a model that packs,
model/packed.py) every batched forward packs its sequences without padding.
"""

from __future__ import annotations

import sqlite3
import time

from mlx_kto.data.batches import Batch
from mlx_kto.data.packing import pack_passes
from mlx_kto.model.load import reference_mode
from mlx_kto.model.logprobs import compiled_sequence_logps, sequence_logps
from mlx_kto.model.packed import can_pack, compiled_packed_logps, packed_sequence_logps
from mlx_kto.reference.cache import (  # noqa: F401
    DB_NAME,
    RefCache,
    check_cache_root,
    default_cache_dir,
    entry_key,
)
from mlx_kto.reference.fingerprint import Fingerprint, reference_fingerprint
from mlx_kto.runtime.streams import active_streams

import mlx.core as mx
import mlx.nn as nn
import numpy as np

# -- computing reference log-probs ------------------------------------------------------


def reference_forward(
    model: nn.Module,
    tokens: mx.array,
    mask: mx.array,
    frozen: dict[str, mx.array] | None = None,
    forward=None,
) -> mx.array:
    """log pi_ref(y|x) for each row of tokens [B, T]: adapter off (or the frozen
    starting adapter), dropout off, no gradient. Returns [B] float32. `forward(tokens, mask)`
    (e.g. `compiled_sequence_logps(model)`, only ever called in reference mode) replaces the
    eager `sequence_logps`."""
    with reference_mode(model, frozen):
        if forward is None:
            out = sequence_logps(model, tokens, mask)
        else:
            out = forward(tokens, mask)
        out = mx.stop_gradient(out)
        mx.eval(out)
    return out


def reference_packed_forward(
    model: nn.Module,
    seqs: list,
    starts: list[int],
    frozen: dict[str, mx.array] | None = None,
    forward=None,
    pass_tokens: int = 0,
) -> mx.array:
    """`reference_forward` of sequences `seqs` (token lists, completion from `starts`) packed
    without padding (data/packing.py), in passes of at most `pass_tokens` tokens evaluated
    one after another (0 = one pass); [len(seqs)] float32. `forward(pk, n_rows)` (e.g.
    `compiled_packed_logps(model)`, only ever called in reference mode) replaces the eager
    `packed_sequence_logps`."""
    groups = max(1, active_streams())  # packs run side by side on the row streams
    seqs = [list(map(int, s)) for s in seqs]
    passes = pack_passes(seqs, starts, groups=groups, budget=pass_tokens)
    with reference_mode(model, frozen):
        out = None
        for pieces in passes:
            arrays = [p.arrays() for p in pieces]  # one piece per row stream
            if forward is None:
                part = packed_sequence_logps(model, arrays, len(seqs))
            else:
                part = forward(arrays, len(seqs))
            out = mx.stop_gradient(part if out is None else out + part)  # [len(seqs)]
            mx.eval(out)  # one pass's activations at a time
    return out


def _pad_cols(x: mx.array, T: int, value=0) -> mx.array:
    return x if x.shape[1] == T else mx.pad(x, [(0, 0), (0, T - x.shape[1])], constant_values=value)


def _spans(tokens: np.ndarray, mask: np.ndarray):
    """Per row: (ids up to the completion end, mask row, completion start, contiguous) or
    None for a row with no completion token (its log-prob is exactly 0)."""
    out = []
    for t, m in zip(tokens, mask, strict=True):
        pos = np.flatnonzero(m)
        if pos.size == 0:
            out.append(None)
            continue
        start, end = int(pos[0]), int(pos[-1]) + 1
        out.append((t[:end], m[:end], start, pos.size == end - start))
    return out


class ReferenceScorer:
    """Reference log-probs of a batch's sequences and KL sequences, through the cache when
    one is given (lazy: only misses are computed, in one batched forward).

    Counts forwards, sequences computed, cache hits/misses and time so callers can report
    (and tests can check) how much reference work was done."""

    def __init__(
        self,
        model: nn.Module,
        frozen: dict[str, mx.array] | None = None,
        cache: RefCache | None = None,
        fingerprint: Fingerprint | str | None = None,
        compile: bool = True,
        packing: bool = False,
        pass_tokens: int = 0,
    ):
        if cache is not None and fingerprint is None:
            raise ValueError("a RefCache needs the reference fingerprint")
        self.model = model
        # Compiled (fused elementwise ops), traced and called only inside reference_mode.
        self._forward = compiled_sequence_logps(model) if compile else None
        self.packing = packing and can_pack(model)
        self.pass_tokens = pass_tokens  # packed forwards run in passes of this many tokens
        self._packed_forward = compiled_packed_logps(model) if compile and self.packing else None
        self.frozen = frozen
        self.cache = cache
        self.fingerprint = fingerprint.id if isinstance(fingerprint, Fingerprint) else fingerprint
        self.fp_id = cache.register(fingerprint) if cache is not None else None
        self.forwards = 0  # batched reference forwards run
        self.rows_computed = 0  # sequences scored by a forward
        self.hits = 0  # sequences answered by the cache
        self.misses = 0  # sequences looked up and not found (computed, then stored)
        self.seconds = 0.0

    def __call__(self, batch: Batch) -> tuple[mx.array, mx.array | None]:
        """Returns (ref_logps [B], ref_kl_logps [B] or None when the batch has no KL part)."""
        t0 = time.perf_counter()
        try:
            if self.cache is None:
                return self._uncached(batch)
            return self._cached(batch)
        finally:
            self.seconds += time.perf_counter() - t0

    def _uncached(self, batch: Batch) -> tuple[mx.array, mx.array | None]:
        B = batch.tokens.shape[0]
        if self.packing:
            return self._uncached_packed(batch)
        if batch.kl_tokens is None:
            ref = reference_forward(
                self.model, batch.tokens, batch.mask, self.frozen, self._forward
            )
            kl = None
        else:
            # One forward over [main; KL] rows: fewer, larger matmuls.
            T = max(batch.tokens.shape[1], batch.kl_tokens.shape[1])
            toks = mx.concatenate([_pad_cols(batch.tokens, T), _pad_cols(batch.kl_tokens, T)])
            mask = mx.concatenate([_pad_cols(batch.mask, T), _pad_cols(batch.kl_mask, T)])
            out = reference_forward(self.model, toks, mask, self.frozen, self._forward)  # [2B]
            ref, kl = out[:B], out[B:]
        self.forwards += 1
        self.rows_computed += B if kl is None else 2 * B
        return ref, kl

    def _batch_spans(self, batch: Batch) -> list:
        spans = _spans(np.array(batch.tokens), np.array(batch.mask))
        if batch.kl_tokens is not None:
            spans += _spans(np.array(batch.kl_tokens), np.array(batch.kl_mask))
        return spans

    def _score_spans(self, spans: list) -> np.ndarray:
        """Reference log-probs [M] float32 of spans (`_spans` entries, none None): packed
        when this scorer packs and every completion is one contiguous run, else padded."""
        if self.packing and all(s[3] for s in spans):
            out = reference_packed_forward(
                self.model, [s[0] for s in spans], [s[2] for s in spans], self.frozen,
                self._packed_forward, self.pass_tokens,
            )  # fmt: skip
            return np.array(out)
        T = max(len(s[0]) for s in spans)
        toks = np.zeros((len(spans), T), dtype=np.int32)  # [M, T], right-padded
        mask = np.zeros((len(spans), T), dtype=bool)  # [M, T]
        for j, (ids, m, _, _) in enumerate(spans):
            toks[j, : len(ids)] = ids
            mask[j, : len(m)] = m
        out = reference_forward(
            self.model, mx.array(toks), mx.array(mask), self.frozen, self._forward
        )
        return np.array(out)

    def _uncached_packed(self, batch: Batch) -> tuple[mx.array, mx.array | None]:
        """`_uncached` with the batch's sequences and KL sequences packed into one forward."""
        B = batch.tokens.shape[0]
        spans = self._batch_spans(batch)
        out = np.zeros(len(spans), dtype=np.float32)  # [B] or [2B]; no-completion rows stay 0
        todo = [i for i, s in enumerate(spans) if s is not None]
        if todo:
            out[todo] = self._score_spans([spans[i] for i in todo])
        self.forwards += 1
        self.rows_computed += len(todo)
        kl = mx.array(out[B:]) if batch.kl_tokens is not None else None
        return mx.array(out[:B]), kl

    def _cached(self, batch: Batch) -> tuple[mx.array, mx.array | None]:
        B = batch.tokens.shape[0]
        spans = self._batch_spans(batch)
        keys = [
            entry_key(self.fingerprint, s[0], s[2]) if s is not None and s[3] else None
            for s in spans
        ]
        found = self.cache.get_many(k for k in keys if k is not None)
        out = np.zeros(len(spans), dtype=np.float32)  # [B] or [2B]; no-completion rows stay 0
        todo: dict = {}  # key (or a private marker for uncacheable rows) -> span positions
        for i, (s, k) in enumerate(zip(spans, keys, strict=True)):
            if s is None:
                continue
            if k in found:
                out[i] = found[k][0]
                self.hits += 1
            else:
                self.misses += 1
                todo.setdefault(k if k is not None else ("row", i), []).append(i)
        if todo:
            first = [pos[0] for pos in todo.values()]
            vals = self._score_spans([spans[i] for i in first])  # [M] float32
            self.forwards += 1
            self.rows_computed += len(first)
            items = []
            for (k, pos), v in zip(todo.items(), vals, strict=True):
                out[pos] = v
                if isinstance(k, bytes):
                    items.append((k, float(v), int(spans[pos[0]][1].sum())))
            self.cache.put_many(self.fp_id, items)
        ref = mx.array(out[:B])
        kl = mx.array(out[B:]) if batch.kl_tokens is not None else None
        return ref, kl

    def stats(self) -> dict:
        return {
            "ref_forwards": self.forwards,
            "ref_rows_computed": self.rows_computed,
            "ref_hits": self.hits,
            "ref_misses": self.misses,
            "ref_seconds": round(self.seconds, 4),
        }


def make_scorer(
    cfg, model: nn.Module, frozen: dict[str, mx.array] | None, model_path, log=print
) -> ReferenceScorer:
    """The scorer a run uses: cached under cfg.ref_cache (or the default folder) unless
    cfg.no_ref_cache. A cache that cannot be opened is reported and skipped."""
    packing = dict(
        packing=getattr(cfg, "packing", False), pass_tokens=getattr(cfg, "pass_budget", 0)
    )
    if cfg.no_ref_cache:
        return ReferenceScorer(model, frozen, compile=cfg.compile, **packing)
    check_cache_root(cfg.ref_cache)  # a misconfigured location is an error, not a warning
    try:
        cache = RefCache(cfg.ref_cache, log=log)
        fp = reference_fingerprint(
            model_path, cfg.quantize, cfg.q_group_size, cfg.dtype, cfg.init_adapter, memo=cache
        )
        scorer = ReferenceScorer(
            model, frozen, cache=cache, fingerprint=fp, compile=cfg.compile, **packing
        )
    except (OSError, sqlite3.Error) as e:
        log(f"warning: reference cache unavailable ({e}); computing reference log-probs uncached")
        return ReferenceScorer(model, frozen, compile=cfg.compile, **packing)
    log(f"reference cache: {cache.root} (fingerprint {fp.id[:12]})")
    return scorer
