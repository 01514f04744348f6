"""log softmax(head(h))[targets] in float32, with analytic backward passes (custom vjps).

    logp[b, c] = logit[b, c, targets[b, c]] - logsumexp(logit[b, c, :]),  logit = head(h)
    d logit[b, c, v] = g[b, c] * (1[v == targets[b, c]] - softmax(logit[b, c])[v])

The output projection (LM head) and its log-softmax dominate the memory of a log-prob pass
over a large vocabulary: [B, C, V] float32 logits. Three ways to compute it, picked by
`model/logprobs.py::token_logps`:

- `head_target_logps`: the whole sequence at once; the backward is one fused multiply (the
  softmax kept from the forward) or one softmax (the logits kept), then the head's vjp;
- `head_logps_grad_ahead`: a frozen head under a gradient: its gradient taken in the forward,
  chunk by chunk, so nothing of vocabulary size outlives its chunk;
- `chunked_target_logps`: sequence chunks chained by `mx.depends`, each chunk's logits rebuilt
  in the backward (gradient checkpointing of the head).
"""

from __future__ import annotations

from collections.abc import Callable

from mlx_kto.runtime import fastops

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten


def target_logps(head: Callable, h: mx.array, targets: mx.array) -> mx.array:
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


def head_target_logps(
    module: nn.Module | None, head: Callable, h: mx.array, targets: mx.array, keep_probs: bool
) -> mx.array:
    """`target_logps` with an analytic backward (custom vjp): d logits = g * (onehot - softmax),
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


# Float32 logits per chunk of the frozen head's forward-side gradient (`head_logps_grad_ahead`).
AHEAD_CHUNK_LOGITS = 1 << 21


def ahead_chunk_size(batch: int, vocab: int | None) -> int:
    """Sequence positions per chunk of `head_logps_grad_ahead`: about AHEAD_CHUNK_LOGITS
    float32 logits (at least 16 positions)."""
    return max(16, AHEAD_CHUNK_LOGITS // max(1, batch * (vocab or 1)))


def head_logps_grad_ahead(head: Callable, h: mx.array, targets: mx.array, chunk_size: int):
    """`target_logps` for a frozen output projection (no trainable parameters), with its
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


def chunked_target_logps(
    module: nn.Module | None, head: Callable, h: mx.array, targets: mx.array, chunk_size: int
) -> mx.array:
    """`target_logps` over sequence chunks of `chunk_size` positions, with bounded memory both
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
            parts.append(target_logps(lambda x: proj.logits(x, params), hs, targets[:, s:e]))
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
