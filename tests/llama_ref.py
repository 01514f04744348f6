"""llama.cpp (llama-cpp-python) as the reference for real GGUF files: logits with and without
a LoRA, a float32 copy of a quantized file (llama.cpp's own dequantization), and an adapter
with fixed random lora_b made on the GGUF-loaded model (an effect that does not depend on
a training trajectory)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.model.load import adapter_config, apply_lora, load_base, save_adapter

import mlx.core as mx
import numpy as np
import pytest


def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed (CI builds it: .ci/interop.sh)"
    )


def llama_logits(model_path, tokens, lora_path=None, n_ctx: int = 128) -> np.ndarray:
    """llama.cpp's float32 logits [T, V] (f32 KV cache) of `tokens`, with an optional LoRA."""
    lc = llama_cpp()
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = lc.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=2,
                   logits_all=True, verbose=False, seed=0, type_k=0, type_v=0, **kw)  # fmt: skip
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def f32_copy(src: Path, out: Path) -> Path:
    """The GGUF with every tensor dequantized to F32 by llama.cpp (llama_model_quantize,
    LLAMA_FTYPE_ALL_F32): the values the quantized file holds, computed without llama.cpp's
    8-bit activation rounding."""
    lc = llama_cpp()
    if not out.exists():
        params = lc.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = 0, True, 2
        assert (
            lc.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
        )
    return out


def random_adapter(gguf_path, out, seed=0, num_layers=2, rank=4, size=0.05):
    """An mlx-lm adapter with random non-zero lora_b on the GGUF-loaded model; returns
    (adapter dir, that model with the adapter, in eval mode)."""
    cfg = KTOConfig(model=str(gguf_path), lora_rank=rank, num_layers=num_layers, seed=seed)
    cfg.validate()
    model, tok, _, _ = load_base(cfg, log=lambda *_: None)
    apply_lora(model, cfg)
    for i, (_, m) in enumerate(model.named_modules()):
        if hasattr(m, "lora_b"):
            m.lora_b = size * mx.random.normal(m.lora_b.shape, key=mx.random.key(seed * 97 + i))
    model.eval()
    save_adapter(model, out, adapter_config(cfg, str(gguf_path), num_layers))
    return out, model, tok
