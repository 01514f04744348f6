"""The exp-based ops of `fastops` (softmax, logsumexp, SiLU, SwiGLU) on an exp written as
plain multiply/add MLX ops (see runtime/fastops.py for why):

    exp(x) = 2^r * P(f),  y = x * log2(e),  r = round(y),  f = y - r in [-1/2, 1/2]

with P the degree-6 Cephes polynomial for 2^f (the coefficients MLX's own `simd::exp` uses) and
2^r exact from integer shifts. Only inputs x <= 0 are needed here (softmax and
logsumexp after subtracting the max, sigmoid through exp(-|x|)); below -87 the result is 0.
Relative error against float64 exp: the same as `mx.exp` (both round x * log2(e) to float32
first: a few ulp near 0, ~5e-6 relative at -87).

The gradients are analytic (custom vjps), so the backward passes add no further exps:

    d softmax:  dx = y * (g - sum(g * y))
    d silu:     dx = g * s * (1 + x * (1 - s)),  s = sigmoid(x)
"""

from __future__ import annotations

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
