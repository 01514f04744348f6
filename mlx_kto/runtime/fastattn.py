"""Attention on fastops' arithmetic softmax, with flash-style backward passes (the
probabilities rebuilt in the backward, not kept): causal, and under a boolean mask (packed
sequences, model/packed.py); `make_sdpa` wraps mlx-lm's `scaled_dot_product_attention`."""

from __future__ import annotations

from collections.abc import Callable

from mlx_kto.runtime.fastexp import _fresh, _softmax, _softmax_vjp, _with_vjp, softmax

import mlx.core as mx


def _causal_softmax_fns(scale: float):
    """(forward, backward) of softmax(where(causal, scale * x, -inf)) over x [..., L, S], each
    compiled: the mask, the scale, the exp and the normalisation fused (eager, the mask's
    select and the scale's multiply were passes of their own over [B, H, L, S], forward and
    backward). Query row i keeps keys j <= i + S - L.

        dx = scale * y * (g - sum(g * y))   (masked entries: y = 0, so dx = 0)"""

    def forward(x: mx.array) -> mx.array:
        L, S = x.shape[-2:]
        keep = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]  # [L, S]
        xf = mx.where(keep, x.astype(mx.float32) * scale, -mx.inf)
        return _softmax(xf).astype(x.dtype)  # inlined into this trace: one kernel

    def backward(g: mx.array, y: mx.array) -> mx.array:
        return (scale * _softmax_vjp(g, y.astype(mx.float32))).astype(y.dtype)

    return mx.compile(forward), mx.compile(backward)


_CAUSAL: dict[float, Callable] = {}


def causal_softmax(x: mx.array, scale: float) -> mx.array:
    """softmax over the last axis of scale * x with a causal mask (x [..., L, S]: the L queries
    are the last L of the S keys), in x's dtype."""
    if scale not in _CAUSAL:
        forward, backward = _causal_softmax_fns(scale)
        _CAUSAL[scale] = _with_vjp(forward, lambda xs, g, y: [backward(g, y)])
    return _CAUSAL[scale](x)


def _causal_attention_fns(scale: float):
    """(forward, backward) of causal attention over query rows grouped by KV head,
    q [B, Hkv, R*L, D] (R query heads per KV head, each L rows), k and v [B, Hkv, S, D]:

        P = causal_softmax(q k^T * scale),  out = P v

    The backward keeps q, k, v only and rebuilds P (flash-attention style: one more
    q k^T and softmax per layer, ~1% of a step) instead of keeping P and the scores alive
    from the forward to the backward of every layer (two [B, H, L, S] arrays each):

        dV = P^T g,  dP = g V^T,  dS = scale * P * (dP - sum(dP * P)),  dQ = dS K,  dK = dS^T Q"""
    soft, soft_vjp = _causal_softmax_fns(scale)

    def probs(q, k, R):
        B, Hkv, RL, _ = q.shape
        s = q @ k.swapaxes(-1, -2)  # [B, Hkv, R*L, S]
        return soft(s.reshape(B, Hkv, R, RL // R, -1)).reshape(s.shape)

    def forward(q, k, v, R):
        return probs(q, k, R) @ v  # [B, Hkv, R*L, D]

    def backward(q, k, v, g, R):
        B, Hkv, RL, _ = q.shape
        p = probs(q, k, R)  # [B, Hkv, R*L, S]
        dv = p.swapaxes(-1, -2) @ g  # [B, Hkv, S, D]
        dp = (g @ v.swapaxes(-1, -2)).reshape(B, Hkv, R, RL // R, -1)
        ds = soft_vjp(dp, p.reshape(dp.shape)).reshape(p.shape)  # [B, Hkv, R*L, S]
        return ds @ k, ds.swapaxes(-1, -2) @ q, dv

    return forward, backward


_ATTN: dict[float, tuple] = {}  # scale -> (compiled forward, compiled backward, ops by R)


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale, causal) v with grouped-query heads: q [B, Hq, L, D], k and v
    [B, Hkv, S, D] (the L queries are the last L of the S keys) -> [B, Hq, L, D]. A custom
    op whose backward rebuilds the probabilities (`_causal_attention_fns`)."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    if scale not in _ATTN:
        forward, backward = _causal_attention_fns(scale)
        _ATTN[scale] = (mx.compile(forward), mx.compile(backward), {})
    fwd, bwd, ops = _ATTN[scale]
    R = Hq // Hkv  # query heads per KV head: static per op (one per model)
    if R not in ops:
        ops[R] = _with_vjp(
            lambda q, k, v: fwd(q, k, v, R),
            lambda xs, g, y: bwd(*_fresh(xs, g), g, R),
        )
    out = ops[R](q.reshape(B, Hkv, R * L, D), k, v)  # [B, Hkv, R*L, D]
    return out.reshape(B, Hq, L, D)


def _masked_attention_fns(scale: float):
    """(forward, backward) of attention under a boolean mask keep [B, 1, L, S] (True = attend;
    every query row keeps at least one key), grouped by KV head as `_causal_attention_fns`,
    with the same flash-style backward (P rebuilt, not kept):

        P = softmax(where(keep, q k^T * scale, -inf)),  out = P v"""

    def probs(q, k, keep, R):
        B, Hkv, RL, _ = q.shape
        s = (q @ k.swapaxes(-1, -2)).reshape(B, Hkv, R, RL // R, -1)  # [B, Hkv, R, L, S]
        x = mx.where(keep[:, :, None], s.astype(mx.float32) * scale, -mx.inf)
        return _softmax(x).astype(q.dtype).reshape(B, Hkv, RL, -1)  # [B, Hkv, R*L, S]

    def forward(q, k, v, keep, R):
        return probs(q, k, keep, R) @ v  # [B, Hkv, R*L, D]

    def backward(q, k, v, keep, g, R):
        B, Hkv, RL, _ = q.shape
        p = probs(q, k, keep, R)  # [B, Hkv, R*L, S]
        dv = p.swapaxes(-1, -2) @ g  # [B, Hkv, S, D]
        dp = (g @ v.swapaxes(-1, -2)).astype(mx.float32)  # [B, Hkv, R*L, S]
        ds = (scale * _softmax_vjp(dp, p.astype(mx.float32))).astype(q.dtype)
        return ds @ k, ds.swapaxes(-1, -2) @ q, dv, mx.zeros_like(keep)

    return forward, backward


_MASKED: dict[float, tuple] = {}  # scale -> (compiled forward, compiled backward, ops by R)


def masked_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, keep: mx.array):
    """softmax(where(keep, q k^T * scale, -inf)) v with grouped-query heads: q [B, Hq, L, D],
    k and v [B, Hkv, S, D], keep [B, 1, L, S] bool (packed sequences' block-diagonal causal
    mask: model/packed.py) -> [B, Hq, L, D]. Its backward rebuilds the probabilities."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    if scale not in _MASKED:
        forward, backward = _masked_attention_fns(scale)
        _MASKED[scale] = (mx.compile(forward), mx.compile(backward), {})
    fwd, bwd, ops = _MASKED[scale]
    R = Hq // Hkv
    if R not in ops:
        ops[R] = _with_vjp(
            lambda q, k, v, keep: fwd(q, k, v, keep, R),
            lambda xs, g, y: bwd(*_fresh(xs, g), g, R),
        )
    out = ops[R](q.reshape(B, Hkv, R * L, D), k, v, keep)  # [B, Hkv, R*L, D]
    return out.reshape(B, Hq, L, D)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """softmax(q k^T * scale + mask) v with grouped-query heads, like MLX's CPU fallback of
    `mx.fast.scaled_dot_product_attention`. q [B, Hq, L, D], k and v [B, Hkv, S, D]; mask None,
    "causal", a bool array (True = attend) or an additive array. -> [B, Hq, L, D]."""
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    rep = Hq // Hkv
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        return causal_attention(q, k, v, scale)
    if mask is not None and mask.dtype == mx.bool_ and mask.ndim == 4 and mask.shape[1] == 1:
        return masked_attention(q, k, v, scale, mx.broadcast_to(mask, (B, 1, L, S)))
    q = (q * scale).reshape(B, Hkv, rep, L, D)  # [B, Hkv, rep, L, D]
    scores = (q @ k[:, :, None].swapaxes(-1, -2)).reshape(B, Hq, L, S)  # [B, Hq, L, S]
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, -mx.inf)
    elif mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = softmax(scores).reshape(B, Hkv, rep, L, S)  # [B, Hkv, rep, L, S]
    return (probs @ v[:, :, None]).reshape(B, Hq, L, D)


def windowed_attention(q, k, v, scale: float, cache, mask, attend: Callable) -> mx.array:
    """Attention of packed rows (data/packing.py, model/packed.py) per pack window: q
    [R, Hq, T, D], k and v [R, Hkv, T, D] gathered into [R*W, H, C, D] (`cache.windows`:
    flat slot -> row position, row position -> flat slot, the block-diagonal causal keep
    mask [R*W, 1, C, C] and each slot's position), `attend(q, k, v, scale, keep)` per window,
    and back to [R, Hq, T, D]. `mask` is the stand-in cache's `make_mask`: None, or a sliding
    window size (keys at most that many positions back)."""
    R, Hq, T, D = q.shape
    gidx, ginv, keep, pos = cache.windows
    C = keep.shape[-1]
    if mask is not None:
        keep = keep & (pos[:, None, :, None] - pos[:, None, None, :] < int(mask))

    def split(x: mx.array) -> mx.array:
        H = x.shape[1]
        flat = x.transpose(0, 2, 1, 3).reshape(R * T, H, D)  # [R*T, H, D]
        return mx.take(flat, gidx, axis=0).reshape(-1, C, H, D).transpose(0, 2, 1, 3)

    out = attend(split(q), split(k), split(v), scale, keep)  # [R*W, Hq, C, D]
    out = mx.take(out.transpose(0, 2, 1, 3).reshape(-1, Hq, D), ginv, axis=0)  # [R*T, Hq, D]
    return out.reshape(R, T, Hq, D).transpose(0, 2, 1, 3)


def make_sdpa(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        # A packed forward's stand-in cache (model/packed.py) holds no keys: attention per
        # pack window.
        packed = getattr(cache, "windows", None) is not None
        if (cache is not None and not packed) or sinks is not None or mx.default_device() != mx.cpu:
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        if packed:
            return windowed_attention(queries, keys, values, scale, cache, mask, masked_attention)
        return attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention
