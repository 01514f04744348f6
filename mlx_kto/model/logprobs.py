"""Sequence log-probabilities of completions under a causal LM (policy or reference).

    seq_logp(x, y) = sum_{t in completion} log softmax(logits_{t-1})[tokens_t]

Standard causal shift (the logits at position t-1 predict token t), a plain sum over the
completion tokens (no length normalisation), prompt and padding masked out; computed in
float32 as `logit[target] - logsumexp(logits)` (TRL 1.16.0 `_compute_loss` / kto-spec.md 2.3).

For mlx-lm models whose head is a plain `lm_head` / tied embedding, the trunk and the head run
separately so that the head + logsumexp can run over sequence chunks: the chunks are chained
(`mx.depends`) so only a few chunks of float32 logits exist at a time, and under `mx.grad` each
chunk's logits are recomputed in the backward pass instead of being kept (a custom vjp;
model/head_logps.py). Other models fall back to `model(inputs)` (only the float32 log-softmax
is chunked then). Inside `runtime.streams.cpu_row_parallel` the rows of a pass are spread
over CPU streams (`map_row_groups`); the numbers are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from mlx_kto.model import head_logps
from mlx_kto.model.head_logps import ahead_chunk_size
from mlx_kto.runtime import traces
from mlx_kto.runtime.streams import (  # noqa: F401  (moved to runtime/streams.py; old import path)
    active_streams,
    cpu_row_parallel,
    default_streams,
    map_row_groups,
    row_groups,
    row_streams,
    rows_unsplit,
)
from mlx_kto.runtime.streams import row_groups as _row_groups  # noqa: F401  (old import path)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

# mlx-lm model types whose `Model.__call__` is exactly `h = self.model(x)` followed by
# `lm_head(h)` or `embed_tokens.as_linear(h)` (no logit scaling or soft-capping after the head).
SPLIT_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "ministral3",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "smollm3",
        "phi3",
        "phimoe",
        "olmo2",
        "olmo3",
        "olmoe",
        "starcoder2",
        "internlm3",
        "helium",
        "exaone4",
        "ernie4_5",
        "ernie4_5_moe",
        "glm",
        "glm4",
        "glm4_moe",
        "deepseek",
        "deepseek_v2",
        "deepseek_v3",
        "mimo",
    }
)

# Vocabularies above this size get a default chunk size (full fp32 logits would dominate memory).
LARGE_VOCAB = 32_768
# Float32 logits per default chunk: 2**23 floats = 32 MiB (MLX keeps a few chunks in flight).
CHUNK_LOGITS = 1 << 23


def _model_type(model) -> str | None:
    mt = getattr(model, "model_type", None)
    if mt is None:
        mt = getattr(getattr(model, "args", None), "model_type", None)
    return mt


def _head(model) -> tuple[nn.Module, Callable] | None:
    """(module holding the output projection, hidden -> logits), or None when the model
    cannot be split."""
    if _model_type(model) not in SPLIT_MODEL_TYPES or not isinstance(
        getattr(model, "model", None), nn.Module
    ):
        return None
    tied = getattr(getattr(model, "args", None), "tie_word_embeddings", False)
    head = getattr(model, "lm_head", None)
    if not tied and isinstance(head, nn.Module):
        return head, head
    emb = getattr(model.model, "embed_tokens", None)
    if tied and isinstance(emb, nn.Module) and hasattr(emb, "as_linear"):
        return emb, emb.as_linear
    return None


def can_split(model) -> bool:
    """True when `hidden_states` returns trunk outputs (not logits) for this model."""
    return _head(model) is not None


def lm_head(model) -> Callable[[mx.array], mx.array]:
    """The output projection hidden -> logits: `model.lm_head`, or the tied embedding's
    `as_linear` (Linear, QuantizedLinear, LoRALinear, Embedding, QuantizedEmbedding alike).
    For models that cannot be split this is the identity, so that
    `lm_head(model)(hidden_states(model, x))` equals `model(x)` for every model."""
    split = _head(model)
    return (lambda h: h) if split is None else split[1]


def hidden_states(model, inputs: mx.array) -> mx.array:
    """Final hidden states `model.model(inputs)` [B, T, H] (after the last norm), or the full
    logits `model(inputs)` [B, T, V] for models that cannot be split (see `lm_head`)."""
    if can_split(model):
        return model.model(inputs)
    return model(inputs)


def vocab_size(model) -> int | None:
    """The output vocabulary size, when known without running the model."""
    v = getattr(getattr(model, "args", None), "vocab_size", None)
    if v is None:
        split = _head(model)
        w = None if split is None else getattr(split[0], "weight", None)
        v = None if w is None else w.shape[0]
    return v


def default_chunk_size(batch: int, vocab: int | None) -> int | None:
    """Sequence positions per chunk when the caller gives none: None (no chunking) for
    vocabularies up to LARGE_VOCAB, else about CHUNK_LOGITS float32 logits per chunk."""
    if vocab is None or vocab <= LARGE_VOCAB:
        return None
    return max(16, CHUNK_LOGITS // (batch * vocab))


def token_logps(
    model,
    tokens: mx.array,
    completion_mask: mx.array,
    chunk_size: int | None = None,
    *,
    for_grad: bool = False,
    head_start: int = 0,
) -> mx.array:
    """Masked per-token log-probs [B, T-1] in float32: entry t is log p(tokens[:, t+1] | tokens[:, :t+1])
    where completion_mask[:, t+1] is set, else exactly 0 (also when the logits there are inf/NaN).

    tokens [B, T] int; completion_mask [B, T] bool/int/float aligned with tokens (1 = completion
    token; position 0 is never a target). chunk_size: sequence positions per LM-head chunk
    (None: `default_chunk_size`). for_grad: the caller differentiates the result; the unchunked
    head then keeps its softmax from the forward so the backward needs no second exp pass
    (a little slower forward; any value gives the same numbers and correct gradients).
    head_start: the caller knows that no row has a completion target before this position of
    the [B, T-1] output (e.g. `Batch.head_start`: the shortest prompt): the LM head and its
    log-softmax skip those positions (their entries are 0 as for any masked position)."""
    if tokens.ndim != 2 or tuple(completion_mask.shape) != tuple(tokens.shape):
        raise ValueError(
            f"tokens must be [B, T] and completion_mask the same shape, got "
            f"{tuple(tokens.shape)} and {tuple(completion_mask.shape)}"
        )
    B, T = tokens.shape
    if T < 2:
        return mx.zeros((B, 0), dtype=mx.float32)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not 0 <= head_start < T - 1:
        head_start = 0 if head_start <= 0 else T - 2  # keep at least one position: valid shapes
    if len(row_groups(B)) > 1 and chunk_size is None:
        # the whole batch's chunk size on every stream: the same memory in total
        chunk_size = default_chunk_size(B, vocab_size(model) if can_split(model) else None)
    return map_row_groups(
        lambda t, m: _token_logps(model, t, m, chunk_size, for_grad, head_start),
        tokens,
        completion_mask,
    )  # [B, T-1]


def _token_logps(model, tokens, completion_mask, chunk_size, for_grad, head_start) -> mx.array:
    B, T = tokens.shape
    mask = completion_mask[:, 1:].astype(mx.bool_)  # [B, T-1]
    # Masked targets point at id 0 so the gather stays in range whatever the padding id is.
    targets = mx.where(mask, tokens[:, 1:], 0)  # [B, T-1]
    # The last position predicts nothing: a causal model's states for [:, :-1] are unchanged.
    h = hidden_states(model, tokens[:, :-1])  # [B, T-1, H] (or [B, T-1, V] logits)
    s = head_start
    if s:
        h, targets = h[:, s:], targets[:, s:]  # [B, T-1-s, H], [B, T-1-s]
    logps = lm_head_logps(model, h, targets, chunk_size, for_grad)  # [B, T-1-s]
    if s:
        logps = mx.concatenate([mx.zeros((B, s), dtype=logps.dtype), logps], axis=1)
    return mx.where(mask, logps, 0.0)  # [B, T-1]


def lm_head_logps(
    model, h: mx.array, targets: mx.array, chunk_size: int | None, for_grad: bool
) -> mx.array:
    """log softmax(lm_head(h))[targets] [B, C] float32 from `hidden_states` h [B, C, H]
    (logits [B, C, V] for a model that cannot be split), by the head path that fits
    (head_logps.py): the gradient ahead for a frozen head under a gradient, else the whole
    sequence at once, or chunks of `chunk_size` positions (None: `default_chunk_size`)."""
    B, C = targets.shape
    split = _head(model)
    module, head = split if split is not None else (None, lambda x: x)
    if chunk_size is None:
        chunk_size = default_chunk_size(B, vocab_size(model) if module is not None else h.shape[-1])
    frozen = module is not None and not tree_flatten(module.trainable_parameters())
    if for_grad and frozen:  # the head's gradient in the forward, chunked (no recompute)
        ahead = chunk_size or ahead_chunk_size(B, vocab_size(model))
        return head_logps.head_logps_grad_ahead(head, h, targets, ahead)
    if chunk_size is None or chunk_size >= C:
        return head_logps.head_target_logps(module, head, h, targets, for_grad)
    return head_logps.chunked_target_logps(module, head, h, targets, chunk_size)


def head_start_of(completion_mask, align: int = 16) -> int:
    """The first [B, T-1] target position any row needs (the shortest prompt, minus one),
    rounded down to `align`; from a concrete mask (host side)."""
    m = np.asarray(completion_mask)[:, 1:]
    cols = np.flatnonzero(m.any(axis=0))
    return 0 if cols.size == 0 else int(cols[0]) // align * align


def compiled_sequence_logps(model: nn.Module, pad_multiple: int = 16) -> Callable:
    """`fn(tokens, mask) -> [B]`: `sequence_logps` for forward-only passes (reference, KL),
    compiled with the model's parameters (and the random state) as inputs, on concrete arrays:
    T is right-padded to a multiple of `pad_multiple` (fewer traces; padding changes nothing
    for a causal model) and the head skips the prompt positions (`head_start_of`).

    The LoRA scale and train/eval mode in effect when a shape is first traced are baked into
    that trace: make one function per mode and only ever call it in that mode (e.g. make and
    call the reference one only inside `reference_mode`, the KL one only in training)."""
    state = [model.state, mx.random.state]

    def make():
        @partial(mx.compile, inputs=state, outputs=[mx.random.state])
        def fn(tokens, mask, head_start):
            return sequence_logps(model, tokens, mask, head_start=head_start)

        return fn

    fn = traces.bounded(make)  # per shape and fastops mode (inside `fast_ops` or not)

    def call(tokens: mx.array, mask: mx.array) -> mx.array:
        T = tokens.shape[1]
        pad = -T % pad_multiple
        if pad:
            tokens = mx.pad(tokens, [(0, 0), (0, pad)])
            mask = mx.pad(mask, [(0, 0), (0, pad)])
        return fn(tokens, mask, head_start_of(mask))

    return call


def sequence_logps(
    model,
    tokens: mx.array,
    completion_mask: mx.array,
    chunk_size: int | None = None,
    *,
    for_grad: bool = False,
    head_start: int = 0,
) -> mx.array:
    """Sum of completion-token log-probs per row, float32 [B] (see module docstring):

        seq_logp[b] = sum_t mask[b, t] * log softmax(logits[b, t-1])[tokens[b, t]]

    Differentiable (nn.value_and_grad, mx.compile; pass for_grad=True when differentiating);
    prompt and padding contribute exactly 0."""
    return token_logps(
        model, tokens, completion_mask, chunk_size, for_grad=for_grad, head_start=head_start
    ).sum(axis=-1)
