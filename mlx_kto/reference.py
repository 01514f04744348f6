"""Reference log-probabilities: the policy's own weights with the adapter off.

Everything that needs reference log-probs goes through `ReferenceScorer`, so a
cache can answer before any forward runs.
"""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.nn as nn

from mlx_kto.batches import Batch
from mlx_kto.logprobs import sequence_logps
from mlx_kto.model import reference_mode


def _pad_cols(x: mx.array, T: int, value=0) -> mx.array:
    return x if x.shape[1] == T else mx.pad(x, [(0, 0), (0, T - x.shape[1])], constant_values=value)


def reference_forward(
    model: nn.Module,
    tokens: mx.array,
    mask: mx.array,
    frozen: dict[str, mx.array] | None = None,
) -> mx.array:
    """log pi_ref(y|x) for each row of tokens [B, T]: adapter off (or the frozen
    starting adapter), dropout off, no gradient. Returns [B] float32."""
    with reference_mode(model, frozen):
        out = mx.stop_gradient(sequence_logps(model, tokens, mask))
        mx.eval(out)
    return out


class ReferenceScorer:
    """Reference log-probs of a batch's sequences and KL sequences.

    Counts forwards and time so callers can report (and tests can check) how
    much reference work was done."""

    def __init__(self, model: nn.Module, frozen: dict[str, mx.array] | None = None):
        self.model = model
        self.frozen = frozen
        self.forwards = 0  # batched reference forwards run
        self.rows_computed = 0  # sequences scored by a forward
        self.seconds = 0.0

    def __call__(self, batch: Batch) -> tuple[mx.array, mx.array | None]:
        """Returns (ref_logps [B], ref_kl_logps [B] or None when the batch has no KL part)."""
        t0 = time.perf_counter()
        B = batch.tokens.shape[0]
        if batch.kl_tokens is None:
            ref = reference_forward(self.model, batch.tokens, batch.mask, self.frozen)
            kl = None
            n = B
        else:
            # One forward over [main; KL] rows: fewer, larger matmuls.
            T = max(batch.tokens.shape[1], batch.kl_tokens.shape[1])
            toks = mx.concatenate([_pad_cols(batch.tokens, T), _pad_cols(batch.kl_tokens, T)])
            mask = mx.concatenate([_pad_cols(batch.mask, T), _pad_cols(batch.kl_mask, T)])
            out = reference_forward(self.model, toks, mask, self.frozen)  # [2B]
            ref, kl = out[:B], out[B:]
            n = 2 * B
        self.forwards += 1
        self.rows_computed += n
        self.seconds += time.perf_counter() - t0
        return ref, kl

    def stats(self) -> dict:
        return {
            "ref_forwards": self.forwards,
            "ref_rows_computed": self.rows_computed,
            "ref_seconds": round(self.seconds, 4),
        }
