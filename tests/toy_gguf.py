"""Write a GGUF base model of a toy Hugging Face folder, laid out like llama.cpp's
convert_hf_to_gguf.py (llama.cpp tensor names, Llama q/k rows permuted, BPE "gpt2" vocab),
with a chosen GGML type per tensor: F32/F16 as floats, BF16 and Q4_0/Q4_1/Q5_0/Q8_0 made by
gguf-py; Q6_K (which gguf-py cannot quantize) gets random blocks with a sane scale."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.export.gguf_lora import llama_permute_rows

import gguf
import mlx.core as mx
import numpy as np

T = gguf.GGMLQuantizationType


def _q6_k_random(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q6_K blocks (ql, qh, int8 scales, then fp16 d last) with d = 1e-3."""
    _, size = gguf.GGML_QUANT_SIZES[T.Q6_K]
    blocks = np.random.default_rng(seed).integers(0, 256, (rows, cols // 256, size), np.uint8)
    blocks[..., -2:] = np.frombuffer(np.float16(1e-3).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _encode(x: np.ndarray, typ: str, seed: int):
    if typ == "F32":
        return x, None
    if typ == "F16":
        return x.astype(np.float16), None
    if typ == "Q6_K":
        return _q6_k_random(*x.shape, seed), T.Q6_K
    q = getattr(T, typ)
    return gguf.quants.quantize(x, q), q


def write_toy_gguf(base: Path, out: Path, types: dict[str, str] | None = None, extra=None):
    """GGUF of the toy HF folder `base`. `types`: GGUF tensor-name suffix (e.g.
    "attn_q.weight", "token_embd.weight", "*" for other 2-D weights) -> GGML type name;
    1-D tensors stay F32. `extra`: additional (name, array) tensors (for refusal tests)."""
    types = types or {}
    cfg = json.loads((base / "config.json").read_text())
    arch = cfg["model_type"]
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("toy")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    tok = json.loads((base / "tokenizer.json").read_text())
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [None] * cfg["vocab_size"]
    for t, i in {**tok["model"]["vocab"], **{v: k for k, v in added.items()}}.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(False)
    jinja = base / "chat_template.jinja"  # transformers 5 keeps the template beside the config
    template = jinja.read_text() if jinja.exists() else None
    template = json.loads((base / "tokenizer_config.json").read_text()).get(
        "chat_template", template
    )
    if template:
        w.add_chat_template(template)

    for i, (name, x) in enumerate(sorted(mx.load(str(base / "model.safetensors")).items())):
        x = np.array(x.astype(mx.float32))
        module, _, leaf = name.rpartition(".")
        g = f"{tmap.get_name(module)}.{leaf}"
        if arch == "llama" and ("attn_q." in g or "attn_k." in g):
            x = llama_permute_rows(x, n_head if "attn_q." in g else n_kv)
        typ = "F32"
        if x.ndim == 2:
            typ = next((t for k, t in types.items() if g.endswith(k)), types.get("*", "F32"))
        data, raw = _encode(x, typ, seed=i)
        w.add_tensor(g, data, raw_dtype=raw)
    for name, x in extra or []:
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
