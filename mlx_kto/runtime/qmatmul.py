"""Quantized layers on MLX's CPU backend: same packed weights, BLAS matmul.

MLX's CPU `quantized_matmul` is a plain loop: multiplying 192 tokens by a 4-bit
[1536, 576] weight takes ~17x as long as the float32 BLAS matmul of the same shape, and
with float16 scales ~20x longer again (measured here, mlx 0.32.4). Dequantizing the
weight inside the call and using BLAS is ~8x faster than the kernel, keeps the packed
weights in memory (the float copy lives for one matmul) and computes the same products
`x @ (scale * q + bias).T` up to summation order. On Metal/CUDA the kernels are fast and
nothing changes. MLX_KTO_CPU_QMM=1 keeps MLX's kernel on the CPU too.
"""

from __future__ import annotations

from mlx_kto.runtime.switches import CPU_QMM

import mlx.core as mx
import mlx.nn as nn


def _dequantized(m) -> mx.array:
    return mx.dequantize(
        m["weight"], m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits,
        mode=m.mode,
    )  # fmt: skip


class DequantMatmulLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear computing `x @ dequantize(W).T (+ b)`."""

    def __call__(self, x):
        y = x @ _dequantized(self).T
        return y + self["bias"] if "bias" in self else y


class DequantMatmulEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output head (`as_linear`) uses a BLAS matmul."""

    def as_linear(self, x):
        return x @ _dequantized(self).T


def use_blas_for_quantized(model: nn.Module) -> int:
    """On the CPU device, switch every affine QuantizedLinear / QuantizedEmbedding of `model`
    to the dequantize + BLAS forward (in place: same parameters). Returns how many."""
    if mx.default_device() != mx.cpu or CPU_QMM.flag():
        return 0
    n = 0
    for _, m in model.named_modules():
        if getattr(m, "mode", "affine") != "affine":
            continue
        if type(m) is nn.QuantizedLinear:
            m.__class__ = DequantMatmulLinear
            n += 1
        elif type(m) is nn.QuantizedEmbedding:
            m.__class__ = DequantMatmulEmbedding
            n += 1
    return n


def dequantizes_per_call(model: nn.Module) -> bool:
    """True when some layer of `model` dequantizes its weight on every call (the CPU path
    `use_blas_for_quantized` installs)."""
    return any(
        type(m) in (DequantMatmulLinear, DequantMatmulEmbedding) for _, m in model.named_modules()
    )
