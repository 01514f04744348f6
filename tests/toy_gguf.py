"""Write a GGUF base model of a toy Hugging Face folder, laid out like llama.cpp's
convert_hf_to_gguf.py (conversion/llama.py, gemma.py, phi.py): llama.cpp tensor names, Llama
q/k rows permuted, Gemma's norms stored as 1 + w, Llama 3's rope_freqs computed from its
llama3 rope scaling, Phi-3's fused qkv / gate_up as they are, the architecture's metadata
keys, a BPE "gpt2" vocab; with a chosen GGML type per tensor: F32/F16 as floats, BF16 and
Q4_0/Q4_1/Q5_0/Q8_0 made by gguf-py; Q6_K (which gguf-py cannot quantize) gets random
blocks with a sane scale. `toy_arch_model` makes the random-weight HF folders of the
architectures toy.build_model does not know (Gemma 3) or configures differently."""

from __future__ import annotations

import json
import math
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


GGUF_ARCH = {"gemma3_text": "gemma3"}  # HF model_type -> GGUF architecture, where they differ


def llama3_rope_factors(cfg: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it from a llama3 rope_scaling
    (conversion/llama.py): 1 for short wavelengths, `factor` for long ones, blended between."""
    rs, dim = (
        cfg["rope_scaling"],
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
    )
    orig = rs.get("original_max_position_embeddings", 8192)
    low_w, high_w = orig / rs.get("low_freq_factor", 1.0), orig / rs.get("high_freq_factor", 4.0)
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * cfg["rope_theta"] ** (i / dim)
        if wavelen < high_w:
            out.append(1.0)
        elif wavelen > low_w:
            out.append(rs["factor"])
        else:
            smooth = (orig / wavelen - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"]
            )
            out.append(1 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, np.float32)


def _arch_metadata(w, cfg: dict, arch: str) -> list:
    """The `{arch}.*` keys llama.cpp's converter writes; returns extra (name, array) tensors."""
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    extra = []
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        if cfg.get("sliding_window_pattern") != 1:
            w.add_sliding_window(cfg["sliding_window"])
    elif arch == "phi3":
        orig = cfg["original_max_position_embeddings"]
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(int(cfg.get("partial_rotary_factor", 1.0) * head_dim))
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        rs = cfg.get("rope_scaling") or {}
        if rs.get("type") == "longrope":  # as conversion/phi.py writes LongRoPE
            scale = cfg["max_position_embeddings"] / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
            extra.append(("rope_factors_long.weight", np.array(rs["long_factor"], np.float32)))
            extra.append(("rope_factors_short.weight", np.array(rs["short_factor"], np.float32)))
    else:
        w.add_rope_dimension_count(head_dim)
        if (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
            extra.append(("rope_freqs.weight", llama3_rope_factors(cfg)))
    return extra


def write_toy_gguf(base: Path, out: Path, types: dict[str, str] | None = None, extra=None):
    """GGUF of the toy HF folder `base`. `types`: GGUF tensor-name suffix (e.g.
    "attn_q.weight", "token_embd.weight", "*" for other 2-D weights) -> GGML type name;
    1-D tensors stay F32. `extra`: additional (name, array) tensors (for refusal tests)."""
    types = types or {}
    cfg = json.loads((base / "config.json").read_text())
    arch = GGUF_ARCH.get(cfg["model_type"], cfg["model_type"])
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, cfg["num_hidden_layers"])
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("toy")
    extra = _arch_metadata(w, cfg, arch) + list(extra or [])

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
        if arch == "gemma3" and g.endswith("norm.weight"):  # Gemma3RMSNorm's 1 + w
            x = x + 1.0
        typ = "F32"
        if x.ndim == 2:
            typ = next((t for k, t in types.items() if g.endswith(k)), types.get("*", "F32"))
        data, raw = _encode(x, typ, seed=i)
        w.add_tensor(g, data, raw_dtype=raw)
    for name, x in extra:
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def toy_arch_model(out_dir: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A random-weight HF folder (toy BPE tokenizer, float32 safetensors) of `family`:
    "gemma3" (Gemma 3 270M's layout: q/k norms, 4 norms a layer, sliding and global layers,
    tied embeddings), "phi3" (fused qkv / gate_up), "phi4mini" (also partial rotary, LongRoPE
    factors, tied embeddings) or "llama32" (Llama 3.2's llama3 rope scaling, tied embeddings). Every norm weight is random too, so a norm stored or mapped
    wrongly changes the logits."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes
    from toy import build_tokenizer, model_config

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    if family == "gemma3":
        cfg = {**model_config("llama", vocab_size=len(tok)), "architectures": ["Gemma3ForCausalLM"],
               "model_type": "gemma3_text", "num_hidden_layers": 6, "num_key_value_heads": 1,
               "head_dim": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
               "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 32,
               "sliding_window": 4, "sliding_window_pattern": 6, "tie_word_embeddings": True,
               "hidden_activation": "gelu_pytorch_tanh", "final_logit_softcapping": None}  # fmt: skip
    elif family == "phi3":
        cfg = model_config("phi3", vocab_size=len(tok), tie_word_embeddings=False)
    elif family == "phi4mini":  # Phi-4-mini's layout: partial rotary, LongRoPE, tied
        cfg = {**model_config("phi3", vocab_size=len(tok), tie_word_embeddings=True),
               "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
               "original_max_position_embeddings": 4096,
               "rope_scaling": {"type": "longrope", "long_factor": [1.0, 1.5, 3.0, 9.0, 20.0, 40.0],
                                "short_factor": [1.0, 1.2, 1.9, 2.5, 4.0, 8.0]}}  # fmt: skip
    elif family == "llama32":  # rope factors that matter within a few tokens: orig 64
        cfg = {**model_config("llama", vocab_size=len(tok), tie_word_embeddings=True),
               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}}  # fmt: skip
    else:
        raise ValueError(family)
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, **overrides)  # fmt: skip
    mx.random.seed(seed)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    weights = {}
    for i, (k, v) in enumerate(sorted(tree_flatten(model.parameters()))):
        if v.ndim == 1:  # norms: around their neutral value, not exactly it
            v = (0.0 if family == "gemma3" else 1.0) + 0.2 * mx.random.normal(
                v.shape, key=mx.random.key(seed * 1000 + i)
            )
        weights[k] = v.astype(mx.float32)
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir
