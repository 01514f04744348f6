"""Converters: Hugging Face -> MLX, mlx-lm adapters <-> PEFT, -> llama.cpp LoRA GGUF,
-> Ollama model folders, and fused Hugging Face checkpoints. Each checks names and shapes
and refuses what it cannot represent exactly (see docs/convert.md)."""

from mlx_kto.export.adapters import MlxAdapter, read_adapter, write_adapter
from mlx_kto.export.fuse import fuse
from mlx_kto.export.gguf_base import gguf_to_mlx
from mlx_kto.export.gguf_lora import check_lora, read_lora_file, to_gguf
from mlx_kto.export.hf import hf_to_mlx
from mlx_kto.export.ollama import to_ollama
from mlx_kto.export.peft import from_peft, to_peft

__all__ = [
    "MlxAdapter",
    "check_lora",
    "from_peft",
    "fuse",
    "gguf_to_mlx",
    "hf_to_mlx",
    "read_adapter",
    "read_lora_file",
    "to_gguf",
    "to_ollama",
    "to_peft",
    "write_adapter",
]
