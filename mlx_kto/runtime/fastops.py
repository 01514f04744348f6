"""Exp-based ops (softmax, logsumexp, SiLU, attention) written as plain arithmetic for MLX's CPU
backend on x86.

Why: the x86-64 `mlx` wheels are built without AVX2/FMA, so every `exp` in a CPU kernel
(`mx.exp`, `mx.softmax`, `mx.logsumexp`, `mx.sigmoid`, and the same ops fused by `mx.compile`)
runs MLX's Cephes polynomial one float at a time, each of its six FMAs a call into libm
(`__fmaf_fma3`): about 20 ns per element, measured with `perf` at ~30% of a forward pass of
the benchmark model (bench/RESULTS.md). The same polynomial written as MLX multiply/add ops
has no calls in it, fuses under `mx.compile`, and costs about 5 ns per element.

    exp(x) = 2^r * P(f),  y = x * log2(e),  r = round(y),  f = y - r in [-1/2, 1/2]

with P the degree-6 Cephes polynomial for 2^f (the coefficients MLX's own `simd::exp` uses) and
2^r exact from integer shifts. Only inputs x <= 0 are needed here (softmax and
logsumexp after subtracting the max, sigmoid through exp(-|x|)); below -87 the result is 0.
Relative error against float64 exp: the same as `mx.exp` (both round x * log2(e) to float32
first: a few ulp near 0, ~5e-6 relative at -87).

The gradients are analytic (custom vjps), so the backward passes add no further exps:

    d softmax:  dx = y * (g - sum(g * y))
    d silu:     dx = g * s * (1 + x * (1 - s)),  s = sigmoid(x)

`fast_ops(model)` swaps mlx-lm's `scaled_dot_product_attention` and `swiglu` in the model's
own module for these while the context is open (CPU device on x86); the model's weights and
structure are untouched. The LM head keeps MLX's own softmax: its exp is ~1% of a step, and
the arithmetic exp's temporaries over [B, T, vocab] would raise peak memory (722 -> 866 MB on
the benchmark model, and 438 -> 852 MB with gradient checkpointing).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mlx_kto.runtime.switches import FAST_EXP

import mlx.core as mx

LOG2E = 1.4426950408889634
EXP_MIN = -87.0  # exp(-87) = 1.6e-38, the smallest normal float32 is 1.2e-38
# 2^f on [-1/2, 1/2], highest degree first (Cephes, as in MLX's simd::exp).
P2 = (
    1.535336188319500e-4,
    1.339887440266574e-3,
    9.618437357674640e-3,
    5.550332471162809e-2,
    2.402264791363012e-1,
    6.931472028550421e-1,
    1.0,
)


def wanted() -> bool:
    """Use the arithmetic ops: CPU device on x86 (where MLX's exp is scalar); $MLX_KTO_FAST_EXP
    set to 0 or 1 overrides."""
    forced = FAST_EXP.flag()
    if forced is not None:
        return forced
    if mx.default_device() != mx.cpu:
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def exp_nonpos(x: mx.array) -> mx.array:
    """exp(x) for float32 x <= 0 (larger x are not supported), 0 below -87, NaN stays NaN.
    Forward only: its autograd is not exp's (the functions below carry their own vjps).

    Written to fuse into one kernel under mx.compile: the polynomial in Estrin's form and 2^r
    from integer shifts converted to float (2^-n = 1 / (2^a 2^b), a + b = n <= 126, exact),
    not a bit cast (`view` is not fusable) and no Horner chain: MLX fuses at most 11 ops deep,
    and a longer chain is cut with its shared intermediates written out (6 arrays of x's size
    instead of 1 before; bench/RESULTS.md)."""
    y = x * LOG2E
    r = mx.round(y)  # in [-126, 0] where the result is kept
    f = y - r  # in [-1/2, 1/2]
    q = P2[::-1]  # lowest degree first
    f2 = f * f
    lo = (q[1] * f + q[0]) + f2 * (q[3] * f + q[2])
    hi = (q[5] * f + q[4]) + f2 * q[6]
    p = lo + (f2 * f2) * hi  # 2^f
    n = (-r).astype(mx.uint64)  # garbage where x < EXP_MIN or NaN: masked below
    a = mx.right_shift(n, 1)
    one = mx.array(1, dtype=mx.uint64)
    two_n = mx.left_shift(one, a).astype(mx.float32) * mx.left_shift(one, n - a).astype(mx.float32)
    return mx.where(x < EXP_MIN, 0.0, p / two_n)


def _one(a):
    """MLX hands a custom vjp a lone array, or a one-element tuple/list."""
    return a[0] if isinstance(a, (list, tuple)) else a


def _softmax(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    e = exp_nonpos(xf - mx.max(xf, axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(x.dtype)


def _softmax_vjp(g: mx.array, y: mx.array) -> mx.array:
    """From the output alone (the input is not kept for the backward)."""
    yf, gf = y.astype(mx.float32), g.astype(mx.float32)
    return (yf * (gf - (gf * yf).sum(axis=-1, keepdims=True))).astype(y.dtype)


def _logsumexp(x: mx.array) -> mx.array:
    m = mx.max(x, axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m), 0.0, m)  # all -inf rows give -inf, not NaN
    return mx.log(exp_nonpos(x - m).sum(axis=-1)) + m.squeeze(-1)


def _logsumexp_vjp(x: mx.array, g: mx.array, out: mx.array) -> mx.array:
    return g[..., None] * exp_nonpos(x - out[..., None])  # softmax(x) * g


def _sigmoid(x: mx.array) -> mx.array:
    e = exp_nonpos(-mx.abs(x))  # in (0, 1]: no overflow either side
    # A clean cut between two fused kernels (exp | the rest), where MLX's depth limit would
    # otherwise cut the chain itself and write out several intermediates (exp_nonpos).
    e = mx.depends(e, x)
    return mx.where(x >= 0, 1.0, e) / (1.0 + e)


def _silu(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf * _sigmoid(xf)).astype(x.dtype)


def _silu_vjp(x: mx.array, g: mx.array) -> mx.array:
    xf, gf = x.astype(mx.float32), g.astype(mx.float32)
    s = _sigmoid(xf)
    return (gf * s * (1.0 + xf * (1.0 - s))).astype(x.dtype)


def _fresh(xs, g):
    """New graph nodes for the primals xs a backward recomputes from: in a compiled step,
    common-subexpression elimination would otherwise share the recomputation (silu's sigmoid,
    attention's scores) with the forward's and keep it alive until the backward."""
    return mx.depends(list(xs), [g])


def _with_vjp(forward, backward):
    """forward(*xs) as a custom function whose vjp is backward(xs, g, y) (returning one
    cotangent per x), run on the stream the forward ran on (MLX runs a custom vjp on the
    default stream of the moment; rows spread over CPU streams by `cpu_row_parallel` would
    otherwise serialise their backward passes). One custom function per stream. What the
    backward graph reads is all that stays alive for it: a backward that reads only y (or
    only some xs) frees the rest after the forward."""
    made = {}

    def make(stream):
        fn = mx.custom_function(forward)

        @fn.vjp
        def vjp(primals, cotangents, outputs):
            xs = (primals,) if isinstance(primals, mx.array) else tuple(primals)
            with mx.stream(stream):
                d = backward(xs, _one(cotangents), _one(outputs))
            return d[0] if len(xs) == 1 else tuple(d)

        return fn

    def call(*xs: mx.array) -> mx.array:
        stream = mx.default_stream(mx.default_device())
        key = repr(stream)  # "Stream(Device(cpu, 0), 1)"
        if key not in made:
            made[key] = make(stream)
        return made[key](*xs)

    call.__doc__ = forward.__doc__
    return call


# Each piece compiled on its own: fused kernels in forward-only passes and in backward passes,
# inlined into a compiled caller. Inside an eager value_and_grad their inputs are tracers and
# MLX runs them op by op (mx.compile falls back); trainer._grouped compiles the step instead.
_softmax, _softmax_vjp, _logsumexp, _logsumexp_vjp, _silu, _silu_vjp = map(
    mx.compile, (_softmax, _softmax_vjp, _logsumexp, _logsumexp_vjp, _silu, _silu_vjp)
)


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


softmax = _with_vjp(_softmax, lambda xs, g, y: [_softmax_vjp(g, y)])
softmax.__doc__ = """softmax over the last axis, in x's dtype (float32 inside)."""
logsumexp = _with_vjp(_logsumexp, lambda xs, g, y: [_logsumexp_vjp(*_fresh(xs, g), g, y)])
logsumexp.__doc__ = """log sum exp over the last axis [..., V] -> [...]."""
silu = _with_vjp(_silu, lambda xs, g, y: [_silu_vjp(*_fresh(xs, g), g)])
silu.__doc__ = """x * sigmoid(x)."""


def _swiglu(gate: mx.array, x: mx.array) -> mx.array:
    gf = gate.astype(mx.float32)
    return (gf * _sigmoid(gf) * x).astype(x.dtype)


def _swiglu_vjp(gate: mx.array, x: mx.array, g: mx.array) -> tuple[mx.array, mx.array]:
    gf, xf, gg = gate.astype(mx.float32), x.astype(mx.float32), g.astype(mx.float32)
    s = _sigmoid(gf)
    d_gate = gg * xf * s * (1.0 + gf * (1.0 - s))
    return d_gate.astype(gate.dtype), (gg * gf * s).astype(x.dtype)


_swiglu, _swiglu_vjp = mx.compile(_swiglu), mx.compile(_swiglu_vjp)
_swiglu_op = _with_vjp(_swiglu, lambda xs, g, y: _swiglu_vjp(*_fresh(xs, g), g))


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu`: silu(gate) * x, one op: its backward keeps only gate and x
    (silu(gate) and the product are rebuilt), with s = sigmoid(gate)

        d gate = g * x * s * (1 + gate * (1 - s)),   d x = g * gate * s"""
    return _swiglu_op(gate, x)


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
    q = (q * scale).reshape(B, Hkv, rep, L, D)  # [B, Hkv, rep, L, D]
    scores = (q @ k[:, :, None].swapaxes(-1, -2)).reshape(B, Hq, L, S)  # [B, Hq, L, S]
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, -mx.inf)
    elif mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs = softmax(scores).reshape(B, Hkv, rep, L, S)  # [B, Hkv, rep, L, S]
    return (probs @ v[:, :, None]).reshape(B, Hq, L, D)


def _make_sdpa(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if cache is not None or sinks is not None or mx.default_device() != mx.cpu:
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention.original = original
    return scaled_dot_product_attention


_ACTIVE = [False]


def active() -> bool:
    """True inside `fast_ops` (compiled functions keep one trace per mode: `per_mode`)."""
    return _ACTIVE[0]


def per_mode(make: Callable[[], Callable]) -> Callable:
    """A function that calls `make()`'s result for the current mode (inside `fast_ops` or
    not), making it on first use: for compiled functions, whose traces keep the ops they were
    traced with. `make` must build a new function object each call (MLX keys its trace cache
    by the Python function)."""
    made: dict[bool, Callable] = {}

    def call(*args, **kwargs):
        mode = active()
        if mode not in made:
            made[mode] = make()
        return made[mode](*args, **kwargs)

    return call


@contextmanager
def fast_ops(model, enable: bool | None = None) -> Iterator[bool]:
    """Within the context (when `wanted()`, or `enable`), the model's mlx-lm module uses
    `attention` and `swiglu` above. Yields whether the fast ops are on. Compiled functions
    keep the ops they were traced with: wrap them in `per_mode`. Re-entrant."""
    enable = wanted() if enable is None else enable
    if not enable or _ACTIVE[0]:
        yield _ACTIVE[0]
        return
    module = sys.modules.get(type(model).__module__)
    saved = {}
    if module is not None and module.__name__.startswith("mlx_lm.models."):
        sdpa = getattr(module, "scaled_dot_product_attention", None)
        if sdpa is not None and not hasattr(sdpa, "original"):
            saved["scaled_dot_product_attention"] = sdpa
            module.scaled_dot_product_attention = _make_sdpa(sdpa)
        if getattr(module, "swiglu", None) is not None:
            saved["swiglu"] = module.swiglu
            module.swiglu = swiglu
    _ACTIVE[0] = True
    try:
        yield True
    finally:
        _ACTIVE[0] = False
        for name, value in saved.items():
            setattr(module, name, value)
