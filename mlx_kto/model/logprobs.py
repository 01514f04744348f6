"""Sequence log-probabilities of completions under a causal LM (policy or reference).

    seq_logp(x, y) = sum_{t in completion} log softmax(logits_{t-1})[tokens_t]

Standard causal shift (the logits at position t-1 predict token t), a plain sum over the
completion tokens (no length normalisation), prompt and padding masked out; computed in
float32 as `logit[target] - logsumexp(logits)` (TRL 1.16.0 `_compute_loss` / kto-spec.md 2.3).

For mlx-lm models whose head is a plain `lm_head` / tied embedding, the trunk and the head run
separately so that the head + logsumexp can run over sequence chunks: the chunks are chained
(`mx.depends`) so only a few chunks of float32 logits exist at a time, and under `mx.grad` each
chunk's logits are recomputed in the backward pass instead of being kept (a custom vjp). Other
models fall back to `model(inputs)` (only the float32 log-softmax is chunked then).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

from mlx_kto.runtime import fastops

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

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


def _target_logps(head: Callable, h: mx.array, targets: mx.array) -> mx.array:
    """log softmax(head(h))[targets] in float32. h [B, C, H|V], targets [B, C] -> [B, C]."""
    logits = head(h).astype(mx.float32)  # [B, C, V]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)  # [B, C]
    return picked - mx.logsumexp(logits, axis=-1)


def _dlogits(probs: mx.array, targets: mx.array, g: mx.array) -> mx.array:
    """Cotangent of the logits for out = log softmax(logits)[targets] with cotangent g:

        d logits[b, c, v] = g[b, c] * (1[v == targets[b, c]] - softmax(logits)[b, c, v])

    probs [B, C, V], targets and g [B, C]. Written as one broadcast elementwise expression so
    that mx.compile fuses it into a single pass (no one-hot or scatter array)."""
    iota = mx.arange(probs.shape[-1], dtype=targets.dtype)  # [V]
    onehot = iota == targets[..., None]  # [B, C, V] (fused, never materialised when compiled)
    return g[..., None] * (onehot.astype(probs.dtype) - probs)


# The LM head's backward passes over [B, C, V], each compiled into one fused kernel (a backward
# runs on concrete arrays, so these fuse also when the step around them is eager).
_dlogits_fused = mx.compile(_dlogits)


@mx.compile
def _dlogits_kept(e: mx.array, s: mx.array, targets: mx.array, g: mx.array) -> mx.array:
    """`_dlogits` with softmax = e / s from the forward (e [B, C, V], s [B, C, 1])."""
    return _dlogits(e * (1.0 / s), targets, g)


def _softmax(logits: mx.array) -> mx.array:
    return fastops.softmax(logits) if fastops.active() else mx.softmax(logits, axis=-1)


class _Head:
    """The output projection as a function of explicit (trainable) parameters, so that a custom
    vjp can return their gradients (mlx-lm `grad_checkpoint` style)."""

    def __init__(self, module: nn.Module | None, head: Callable):
        self.module, self.head = module, head
        flat = tree_flatten(module.trainable_parameters()) if module is not None else []
        self.names = [k for k, _ in flat]
        self.params = [v for _, v in flat]

    def logits(self, h: mx.array, params) -> mx.array:
        if params:
            self.module.update(tree_unflatten(list(zip(self.names, params, strict=True))))
        return self.head(h).astype(mx.float32)  # [B, C, V]

    def restore(self, params) -> None:
        """Leave the module holding the primal arrays, not vjp tracers."""
        if params:
            self.module.update(tree_unflatten(list(zip(self.names, params, strict=True))))

    def vjp(self, h: mx.array, params, d_logits: mx.array):
        """(d h, d params) of the projection at h for the logits cotangent. The projection's own
        forward inside mx.vjp is never evaluated (a matmul's vjp does not read its output)."""
        _, grads = mx.vjp(lambda hs, *ps: self.logits(hs, ps), [h, *params], [d_logits])
        return grads[0], list(grads[1:])


def _logps_exp_sum(logits: mx.array, targets: mx.array):
    """(log softmax(logits)[targets] [B, C], e = exp(logits - max) [B, C, V], s = sum(e)
    [B, C, 1]): the softmax parts a backward needs, with MLX's exp as mx.logsumexp forms it,
    so the policy's forward and the reference's agree bit for bit (rewards exactly 0 before
    the first update)."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)  # [B, C]
    m = mx.max(logits, axis=-1, keepdims=True)  # [B, C, 1]
    e = mx.exp(logits - m)  # [B, C, V]
    s = e.sum(axis=-1, keepdims=True)  # [B, C, 1]
    return picked - (m + mx.log(s)).squeeze(-1), e, s


def _head_target_logps(
    module: nn.Module | None, head: Callable, h: mx.array, targets: mx.array, keep_probs: bool
) -> mx.array:
    """`_target_logps` with an analytic backward (custom vjp): d logits = g * (onehot - softmax),
    then the projection's vjp. Against autograd through logsumexp + take_along_axis this skips
    the scatter of the gather's gradient and (keep_probs) the backward's second exp pass:

    keep_probs=True  forward exp(logits - max) once, keep it; backward = one multiply
    keep_probs=False forward logsumexp (cheapest forward), keep the logits; backward softmax

    Either way one [B, C, V] float32 array lives until the backward, as with plain autograd;
    in a forward-only call it is never kept."""
    proj = _Head(module, head)
    stream = mx.default_stream(mx.default_device())  # the vjp runs where the forward ran

    @mx.custom_function
    def fn(h, *params):
        logits = proj.logits(h, params)  # [B, C, V]
        if keep_probs:
            return _logps_exp_sum(logits, targets)
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)  # [B, C]
        return picked - mx.logsumexp(logits, axis=-1), logits, logits

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        h, *params = (primals,) if isinstance(primals, mx.array) else primals
        _, a, b = outputs
        with mx.stream(stream):
            # softmax as autograd through logsumexp forms it (e * (1 / s))
            if keep_probs:
                d_logits = _dlogits_kept(a, b, targets, cotangents[0])  # [B, C, V]
            else:
                d_logits = _dlogits_fused(_softmax(a), targets, cotangents[0])
            d_h, d_params = proj.vjp(h, params, d_logits)
        proj.restore(params)
        return (d_h, *d_params) if params else d_h

    return fn(h, *proj.params)[0]


# Float32 logits per chunk of the frozen head's forward-side gradient (`_head_logps_grad_ahead`).
AHEAD_CHUNK_LOGITS = 1 << 21


def ahead_chunk_size(batch: int, vocab: int | None) -> int:
    """Sequence positions per chunk of `_head_logps_grad_ahead`: about AHEAD_CHUNK_LOGITS
    float32 logits (at least 16 positions)."""
    return max(16, AHEAD_CHUNK_LOGITS // max(1, batch * (vocab or 1)))


def _head_logps_grad_ahead(head: Callable, h: mx.array, targets: mx.array, chunk_size: int):
    """`_target_logps` for a frozen output projection (no trainable parameters), with its
    gradient taken in the forward. The log-prob at position c depends on h[:, c] alone, so

        d out[b, c] / d h[b, c] = J_head^T (onehot(targets[b, c]) - softmax(logits[b, c]))

    is a [B, C, H] array u computed with the logits (the projection's vjp: the same matmul the
    backward would run), and the backward is d h = g[..., None] * u. Nothing of vocabulary
    size outlives its chunk: sequence chunks run one after another (`mx.depends`), so the
    float32 logits of one chunk exist at a time, forward and backward, with no recomputation
    (against keeping softmax [B, C, V] from the forward to the backward: 4 bytes per vocab
    entry and position, against 4 per hidden unit)."""
    n = targets.shape[1]
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    stream = mx.default_stream(mx.default_device())  # the vjp runs where the forward ran

    def chunk(hs: mx.array, ts: mx.array) -> tuple[mx.array, mx.array]:
        logp, e, s = _logps_exp_sum(head(hs).astype(mx.float32), ts)  # [B, C], [B, C, V]
        d_logits = _dlogits_kept(e, s, ts, mx.ones(ts.shape, mx.float32))  # [B, C, V]
        u = mx.vjp(lambda x: head(x).astype(mx.float32), [hs], [d_logits])[1][0]  # [B, C, H]
        return logp, u

    @mx.custom_function
    def fn(h):
        logps, us = [], []
        for s, e in bounds:
            hs = h[:, s:e] if not us else mx.depends(h[:, s:e], us[-1])
            lp, u = chunk(hs, targets[:, s:e])
            logps.append(lp)
            us.append(u)
        if len(bounds) == 1:
            return logps[0], us[0]
        return mx.concatenate(logps, axis=1), mx.concatenate(us, axis=1)  # [B, n], [B, n, H]

    @fn.vjp
    def fn_vjp(primals, cotangents, outputs):
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        with mx.stream(stream):
            return (g[..., None] * outputs[1]).astype(h.dtype)  # [B, n, H]

    return fn(h)[0]


def _chunked_target_logps(
    module: nn.Module | None, head: Callable, h: mx.array, targets: mx.array, chunk_size: int
) -> mx.array:
    """`_target_logps` over sequence chunks of `chunk_size` positions, with bounded memory both
    ways: each chunk's logits are rebuilt in the backward pass (gradient checkpointing) and
    turned into d logits analytically (softmax - onehot: no autograd through logsumexp and the
    gather), and `mx.depends` chains the chunks so that MLX does not run them all at once. Trainable head parameters (if any) are explicit
    inputs so they get gradients (mlx-lm `grad_checkpoint`)."""
    n = h.shape[1]
    bounds = [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    proj = _Head(module, head)
    stream = mx.default_stream(mx.default_device())  # the vjp runs where the forward ran

    @mx.custom_function
    def chunked(h, *params):
        parts = []
        for s, e in bounds:
            hs = h[:, s:e] if not parts else mx.depends(h[:, s:e], parts[-1])
            parts.append(_target_logps(lambda x: proj.logits(x, params), hs, targets[:, s:e]))
        return mx.concatenate(parts, axis=1)  # [B, n]

    @chunked.vjp
    def chunked_vjp(primals, cotangents, outputs):
        # MLX passes a lone primal as the array itself, several as a tuple
        h, *params = (primals,) if isinstance(primals, mx.array) else primals
        g = cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents
        with mx.stream(stream):
            d_h, d_params = [], [mx.zeros_like(p) for p in params]
            for s, e in bounds:
                hs = h[:, s:e] if not d_h else mx.depends(h[:, s:e], d_h[-1])
                probs = _softmax(proj.logits(hs, params))  # [B, C, V]
                d_logits = _dlogits_fused(probs, targets[:, s:e], g[:, s:e])
                d_hs, d_ps = proj.vjp(hs, params, d_logits)
                d_h.append(d_hs)
                d_params = [a + b for a, b in zip(d_params, d_ps, strict=True)]
            d_h = mx.concatenate(d_h, axis=1)
        proj.restore(params)
        return (d_h, *d_params) if params else d_h

    return chunked(h, *proj.params)


# -- rows in parallel on CPU streams ----------------------------------------------------------

# MLX's CPU backend runs each stream's ops on one thread and only its matmuls (BLAS) use more
# cores; elementwise ops (softmax, silu, masking) dominate a small model's step and run on one
# core. Spreading a batch's rows over one stream per core, each with single-threaded BLAS, puts
# every core to work on every op (and backward ops stay on their forward's stream).
_STREAMS: list = []  # CPU streams of the current `cpu_row_parallel` context (empty: off)
_THREAD_STREAMS: dict[int, list] = {}  # streams made per thread (MLX never frees a stream)


def _row_groups(B: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per stream (a single range when parallelism is off)."""
    n = min(len(_STREAMS), B)
    if n < 2 or mx.default_device() != mx.cpu:
        return [(0, B)]
    bounds = [round(i * B / n) for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _blas_threads(n: int | None) -> int | None:
    """Set OpenBLAS's thread count (when mlx_kto preloaded OpenBLAS); returns the previous."""
    from mlx_kto.runtime import blas as _blas

    if not _blas.loaded:
        return None
    try:
        lib = ctypes.CDLL(_blas.loaded)
        prev = lib.openblas_get_num_threads()
        if n is not None:
            lib.openblas_set_num_threads(int(n))
        return prev
    except (OSError, AttributeError):
        return None


def active_streams() -> int:
    """CPU streams the current `cpu_row_parallel` context spreads rows over (0: none)."""
    return len(_STREAMS)


def default_streams() -> int:
    """Streams `cpu_row_parallel` uses by default: one per core on the CPU backend (at most 8;
    $MLX_KTO_CPU_STREAMS overrides, 1 = off), else 1 (a GPU runs rows in parallel already)."""
    env = os.environ.get("MLX_KTO_CPU_STREAMS")
    if env:
        return max(1, int(env))
    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


@contextmanager
def cpu_row_parallel(n: int | None = None) -> Iterator[int]:
    """Within the context, every `token_logps` / `sequence_logps` call (policy, KL and reference
    forwards, their backward passes, compiled or not) spreads its rows over `n` CPU streams
    (default `default_streams()`), and OpenBLAS runs single-threaded per stream; both are
    restored on exit. Results are the same rows, computed the same way (per-row independent).
    Streams belong to the calling thread. Yields the number of streams in use."""
    global _STREAMS
    n = default_streams() if n is None else n
    if n < 2 or mx.default_device() != mx.cpu or _STREAMS:
        yield max(len(_STREAMS), 1)
        return
    prev = _blas_threads(max(1, (os.cpu_count() or n) // n))
    made = _THREAD_STREAMS.setdefault(threading.get_ident(), [])
    made += [mx.new_stream(mx.cpu) for _ in range(n - 1 - len(made))]
    _STREAMS = [mx.default_stream(mx.cpu)] + made[: n - 1]
    try:
        yield n
    finally:
        _STREAMS = []
        if prev is not None:
            _blas_threads(prev)


def row_streams() -> list:
    """The streams of the current `cpu_row_parallel` context (empty: off)."""
    return list(_STREAMS)


@contextmanager
def rows_unsplit() -> Iterator[None]:
    """Within the context, log-prob passes keep their rows on the current stream (for a
    caller that spreads row groups over the streams itself: trainer's grouped step)."""
    global _STREAMS
    saved, _STREAMS = _STREAMS, []
    try:
        yield
    finally:
        _STREAMS = saved


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
    groups = _row_groups(B)
    if len(groups) > 1:
        if chunk_size is None:  # the whole batch's chunk size: same memory in total
            chunk_size = default_chunk_size(B, vocab_size(model) if can_split(model) else None)
        parts = []
        for stream, (a, b) in zip(_STREAMS, groups):
            with mx.stream(stream):
                parts.append(
                    _token_logps(
                        model, tokens[a:b], completion_mask[a:b], chunk_size, for_grad, head_start
                    )
                )
        return mx.concatenate(parts, axis=0)  # [B, T-1]
    return _token_logps(model, tokens, completion_mask, chunk_size, for_grad, head_start)


def _token_logps(model, tokens, completion_mask, chunk_size, for_grad, head_start) -> mx.array:
    B, T = tokens.shape
    mask = completion_mask[:, 1:].astype(mx.bool_)  # [B, T-1]
    # Masked targets point at id 0 so the gather stays in range whatever the padding id is.
    targets = mx.where(mask, tokens[:, 1:], 0)  # [B, T-1]
    # The last position predicts nothing: a causal model's states for [:, :-1] are unchanged.
    h = hidden_states(model, tokens[:, :-1])  # [B, T-1, H] (or [B, T-1, V] logits)
    split = _head(model)
    module, head = split if split is not None else (None, lambda x: x)

    if chunk_size is None:
        chunk_size = default_chunk_size(B, vocab_size(model) if module is not None else h.shape[-1])
    s = head_start
    if s:
        h, targets = h[:, s:], targets[:, s:]  # [B, T-1-s, H], [B, T-1-s]
    frozen = module is not None and not tree_flatten(module.trainable_parameters())
    if for_grad and frozen:  # the head's gradient in the forward, chunked (no recompute)
        ahead = chunk_size or ahead_chunk_size(B, vocab_size(model))
        logps = _head_logps_grad_ahead(head, h, targets, ahead)  # [B, T-1-s]
    elif chunk_size is None or chunk_size >= T - 1 - s:
        logps = _head_target_logps(module, head, h, targets, for_grad)  # [B, T-1-s]
    else:
        logps = _chunked_target_logps(module, head, h, targets, chunk_size)  # [B, T-1-s]
    if s:
        logps = mx.concatenate([mx.zeros((B, s), dtype=logps.dtype), logps], axis=1)
    return mx.where(mask, logps, 0.0)  # [B, T-1]


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

    fn = fastops.per_mode(make)  # one trace cache inside `fastops.fast_ops`, one outside

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
