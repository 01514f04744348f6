"""Exp-based ops (softmax, logsumexp, SiLU, attention) written as plain arithmetic for MLX's CPU
backend on x86.

Why: the x86-64 `mlx` wheels are built without AVX2/FMA, so every `exp` in a CPU kernel
(`mx.exp`, `mx.softmax`, `mx.logsumexp`, `mx.sigmoid`, and the same ops fused by `mx.compile`)
runs MLX's Cephes polynomial one float at a time, each of its six FMAs a call into libm
(`__fmaf_fma3`): about 20 ns per element, measured with `perf` at ~30% of a forward pass of
the benchmark model (bench/RESULTS.md). The same polynomial written as MLX multiply/add ops
has no calls in it, fuses under `mx.compile`, and costs about 5 ns per element.

    exp(x) = 2^r * P(f),  y = x * log2(e),  r = round(y),  f = y - r in [-1/2, 1/2]

(runtime/fastexp.py: the exp and the ops on it, with analytic backward passes;
runtime/fastattn.py: causal and masked attention whose backward rebuilds the probabilities.)

`fast_ops(model)` swaps mlx-lm's `scaled_dot_product_attention` and `swiglu` in the model's
own module for these while the context is open (CPU device on x86); the model's weights and
structure are untouched. The LM head keeps MLX's own softmax: its exp is ~1% of a step, and
the arithmetic exp's temporaries over [B, T, vocab] would raise peak memory (722 -> 866 MB on
the benchmark model, and 438 -> 852 MB with gradient checkpointing).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from mlx_kto.runtime.fastattn import (  # noqa: F401  (the ops, under their documented names)
    attention,
    causal_attention,
    causal_softmax,
    make_sdpa,
    masked_attention,
)
from mlx_kto.runtime.fastexp import exp_nonpos, logsumexp, silu, softmax, swiglu  # noqa: F401
from mlx_kto.runtime.switches import FAST_EXP

import mlx.core as mx


def wanted() -> bool:
    """Use the arithmetic ops: CPU device on x86 (where MLX's exp is scalar); $MLX_KTO_FAST_EXP
    set to 0 or 1 overrides."""
    forced = FAST_EXP.flag()
    if forced is not None:
        return forced
    if mx.default_device() != mx.cpu:
        return False
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


_ACTIVE = [False]


def active() -> bool:
    """True inside `fast_ops` (compiled functions keep one trace per mode: runtime/traces.py)."""
    return _ACTIVE[0]


@contextmanager
def fast_ops(model, enable: bool | None = None) -> Iterator[bool]:
    """Within the context (when `wanted()`, or `enable`), the model's mlx-lm module uses
    `attention` and `swiglu` above. Yields whether the fast ops are on. Compiled functions
    keep the ops they were traced with: make them with `traces.bounded`. Re-entrant."""
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
            module.scaled_dot_product_attention = make_sdpa(sdpa)
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
