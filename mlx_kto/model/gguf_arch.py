"""GGUF architectures as mlx-lm models: the config from a file's `{arch}.*` metadata (the keys
llama.cpp's converter writes and its runtime reads), checked value by value, and what the
loader must do to the tensors (q/k row order, Gemma's norm offset, tensors that are config).

Supported (general.architecture -> mlx-lm model_type):
- llama -> llama (Llama 2/3.x, Mistral, SmolLM): q/k rows stored in ggml's interleaved-rope
  order (undone on load); Llama 3.1/3.2's `rope_freqs` (the llama3 rope scaling factors the
  converter computed) becomes rope_scaling {"rope_type": "llama3", ...}, fitted and checked;
- qwen2, qwen3 -> qwen2, qwen3;
- gemma3 -> gemma3_text (270M / 1B / text 4B+): llama.cpp's converter stores every
  `*norm.weight` as 1 + w (Gemma3RMSNorm's offset) and mlx-lm's RMSNorm adds the 1 itself,
  so 1 is subtracted on load; embeddings scaled by sqrt(hidden) in the model (mlx-lm) as in
  llama.cpp; sliding-window layers every `sliding_window_pattern` (llama.cpp default 6) with
  their own rope base (`rope.freq_base_swa`, default 10000); the attention scale is
  1/sqrt(head_dim) except the 62-layer 27B (1/sqrt(hidden/heads)), as llama.cpp computes it;
- phi3 -> phi3 (Phi-3 mini/medium, Phi-4-mini): fused `attn_qkv` and `ffn_up` (gate and up
  halves) are mlx-lm's qkv_proj / gate_up_proj as stored; LongRoPE files
  (`rope_factors_short/long`) compute with the short factors, the ones llama.cpp uses for a
  context up to the original length (the attention factor applies either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_reader import meta


@dataclass(frozen=True)
class Arch:
    model_type: str  # mlx-lm's
    hf_class: str  # config.json "architectures" (what converters pick the model class by)
    permute_qk: bool = False  # q/k rows in ggml interleaved-rope order (LlamaModel.permute)
    norm_shift: float = 0.0  # added to `*norm.weight` by llama.cpp's converter


ARCHES = {
    "llama": Arch("llama", "LlamaForCausalLM", permute_qk=True),
    "qwen2": Arch("qwen2", "Qwen2ForCausalLM"),
    "qwen3": Arch("qwen3", "Qwen3ForCausalLM"),
    "gemma3": Arch("gemma3_text", "Gemma3ForCausalLM", norm_shift=1.0),
    "phi3": Arch("phi3", "Phi3ForCausalLM"),
}
# Tensors that hold config (read into it here), not parameters.
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


class Keys:
    """Typed, checked reads of `{arch}.*` keys: one line naming the file and key for a value
    that is missing, of the wrong type, or impossible (issue 24: head_count 0)."""

    def __init__(self, path, reader, arch: str):
        self.path, self.reader, self.arch = path, reader, arch

    def _bad(self, key: str, v, why: str):
        raise UserError(f"{self.path}: GGUF metadata {self.arch}.{key} = {v!r} {why}")

    def int(self, key: str, default=None, minimum: int = 1):
        v = meta(self.reader, f"{self.arch}.{key}", default)
        if v is None:
            raise UserError(f"{self.path}: GGUF metadata has no {self.arch}.{key}")
        if isinstance(v, list):
            self._bad(key, v, "is a per-layer list (not supported: one value for all layers)")
        if isinstance(v, bool) or not isinstance(v, int):
            self._bad(key, v, "is not an integer")
        if v < minimum:
            self._bad(key, v, f"is impossible (must be >= {minimum})")
        return v

    def float(self, key: str, default=None, positive: bool = True):
        v = meta(self.reader, f"{self.arch}.{key}", default)
        if v is None:
            raise UserError(f"{self.path}: GGUF metadata has no {self.arch}.{key}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self._bad(key, v, "is not a finite number")
        if positive and v <= 0:
            self._bad(key, v, "is impossible (must be > 0)")
        return float(v)


def _heads(k: Keys, hidden: int) -> tuple[int, int, int]:
    """(heads, kv heads, head_dim), consistent with each other."""
    n_head = k.int("attention.head_count")
    n_kv = k.int("attention.head_count_kv", n_head)
    if n_head % n_kv:
        k._bad("attention.head_count_kv", n_kv, f"does not divide head_count {n_head}")
    default_dim = hidden // n_head if hidden % n_head == 0 else None
    head_dim = k.int("attention.key_length", default_dim)
    if k.int("attention.value_length", head_dim) != head_dim:
        k._bad("attention.value_length", meta(k.reader, f"{k.arch}.attention.value_length"),
               f"differs from key_length {head_dim} (mlx-lm has one head_dim)")  # fmt: skip
    return n_head, n_kv, head_dim


def fit_llama3_rope(factors: list[float], base: float, dim: int) -> dict | None:
    """rope_scaling {"rope_type": "llama3", ...} whose factors (mlx-lm's Llama3RoPE, as the
    converter computed them: 1 for wavelengths under orig/high, `factor` over orig/low, a
    smooth blend between) are `factors`, or None when no such parameters exist. Only
    low/orig and high/orig matter, so orig is fixed at 8192 (the Llama 3.x releases)."""
    factor, orig = max(factors), 8192.0
    inv = [1 / (base ** (2 * i / dim)) / (2 * math.pi) for i in range(len(factors))]  # 1/wavelen
    if factor <= 1:
        return None
    # Medium frequencies: 1/f = (1 - s)/factor + s with s linear in 1/wavelen.
    pts = [(x, (1 / f - 1 / factor) / (1 - 1 / factor)) for x, f in zip(inv, factors)
           if 1.0 + 1e-6 < f < factor * (1 - 1e-6)]  # fmt: skip
    if len(pts) >= 2:
        (x0, s0), (x1, s1) = pts[0], pts[-1]
        a = (s1 - s0) / (x1 - x0)  # = orig / (high - low)
        low = -(s0 - a * x0) * (orig / a)  # s = a x - low/(high-low)
        high = low + orig / a
    else:
        low, high = 1.0, 4.0  # the releases' values; checked below
    cand = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": int(orig)}  # fmt: skip
    got = _llama3_factors(cand, base, dim, len(factors))
    ok = got is not None and all(abs(a - b) <= 1e-4 * b for a, b in zip(got, factors))
    return cand if ok else None


def _llama3_factors(c: dict, base: float, dim: int, n: int) -> list[float] | None:
    """The per-frequency factors a llama3 rope_scaling gives (llama.cpp's converter's rule)."""
    low_w = c["original_max_position_embeddings"] / c["low_freq_factor"]
    high_w = c["original_max_position_embeddings"] / c["high_freq_factor"]
    if not (c["high_freq_factor"] > c["low_freq_factor"] > 0):
        return None
    out = []
    for i in range(n):
        w = 2 * math.pi * base ** (2 * i / dim)
        if w < high_w:
            out.append(1.0)
        elif w > low_w:
            out.append(c["factor"])
        else:
            s = (c["original_max_position_embeddings"] / w - c["low_freq_factor"]) / (
                c["high_freq_factor"] - c["low_freq_factor"]
            )
            out.append(1 / ((1 - s) / c["factor"] + s))
    return out


def _rope_scaling(k: Keys, config: dict, tensors: dict) -> None:
    """Rope scaling from the metadata (linear) or the factor tensors (llama3, LongRoPE)."""
    kind = meta(k.reader, f"{k.arch}.rope.scaling.type")
    if kind not in (None, "none", "linear"):
        raise UserError(f"{k.path}: {k.arch}.rope.scaling.type {kind!r} is not mapped to mlx-lm")
    if kind == "linear":
        factor = k.float("rope.scaling.factor")
        if factor != 1.0:
            config["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": factor}
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        if k.arch != "llama":
            raise UserError(f"{k.path}: rope_freqs.weight is only mapped for llama files")
        rot = k.int("rope.dimension_count", config["head_dim"])
        fit = fit_llama3_rope([float(x) for x in freqs.data.ravel()], config["rope_theta"], rot)
        if fit is None or "rope_scaling" in config:
            raise UserError(
                f"{k.path}: rope_freqs.weight are not llama3 rope scaling factors mlx-lm can "
                "express"
            )
        config["rope_scaling"] = fit


def read_arch_config(path, reader, tensors: dict) -> dict:
    """mlx-lm config.json from a GGUF file's metadata (see the module docstring); `tensors`:
    GGUF tensor name -> tensor info (shapes decide vocab and tied embeddings)."""
    arch = meta(reader, "general.architecture")
    if arch not in ARCHES:
        raise UserError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHES)})"
        )
    if "token_embd.weight" not in tensors:
        raise UserError(f"{path}: no token_embd.weight tensor")
    k = Keys(path, reader, arch)
    spec = ARCHES[arch]
    hidden = k.int("embedding_length")
    n_head, n_kv, head_dim = _heads(k, hidden)
    embd = tensors["token_embd.weight"].shape  # ggml ne = [n_embd, n_vocab]
    if len(embd) != 2 or embd[0] != hidden:
        raise UserError(f"{path}: token_embd.weight has ne {list(embd)}, not [{hidden}, n_vocab]")
    config = {
        "model_type": spec.model_type,
        "architectures": [spec.hf_class],
        "hidden_size": hidden,
        "intermediate_size": k.int("feed_forward_length"),
        "num_hidden_layers": k.int("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": k.float("attention.layer_norm_rms_epsilon"),
        "rope_theta": k.float("rope.freq_base", 10000.0),
        "vocab_size": int(embd[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if meta(reader, f"{arch}.context_length") is not None:
        config["max_position_embeddings"] = k.int("context_length")
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    elif arch == "gemma3":
        _gemma3(k, config)
    elif arch == "phi3":
        _phi3(k, config, tensors)
    _rope_scaling(k, config, tensors)
    for key, gkey in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if (tid := meta(reader, f"tokenizer.ggml.{gkey}_token_id")) is not None:
            config[f"{key}_token_id"] = int(tid)
    return config


def _gemma3(k: Keys, config: dict) -> None:
    if meta(k.reader, f"{k.arch}.final_logit_softcapping") is not None:
        raise UserError(
            f"{k.path}: {k.arch}.final_logit_softcapping is set; mlx-lm's gemma3_text has none"
        )
    window = meta(k.reader, f"{k.arch}.attention.sliding_window")
    pattern = meta(k.reader, f"{k.arch}.attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per layer: True = sliding; mlx-lm takes a period
        period = next((p for p in range(1, len(pattern) + 1)
                       if all(v == ((i % p) < p - 1) for i, v in enumerate(pattern))), None)  # fmt: skip
        if period is None:
            k._bad(
                "attention.sliding_window_pattern", pattern, "is not periodic (mlx-lm: one period)"
            )
        pattern = period
    if window:
        config["sliding_window"] = k.int("attention.sliding_window")
        config["sliding_window_pattern"] = pattern if isinstance(pattern, int) else 6
    else:  # no sliding window: every layer global
        config["sliding_window"] = config.get("max_position_embeddings", 32768)
        config["sliding_window_pattern"] = 1
    config["rope_local_base_freq"] = k.float("rope.freq_base_swa", 10000.0)
    n_layer, head_dim = config["num_hidden_layers"], config["head_dim"]
    # llama.cpp's attention scale: 1/sqrt(head_dim), except Gemma 3 27B (62 layers).
    config["query_pre_attn_scalar"] = (
        config["hidden_size"] / config["num_attention_heads"] if n_layer == 62 else head_dim
    )


def _phi3(k: Keys, config: dict, tensors: dict) -> None:
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    if config["head_dim"] * n_head != hidden:
        k._bad("attention.key_length", config["head_dim"], "x head_count != embedding_length "
               "(mlx-lm's phi3 has head_dim = hidden / heads)")  # fmt: skip
    rot = k.int("rope.dimension_count", config["head_dim"])
    config["partial_rotary_factor"] = rot / config["head_dim"]
    ctx = config.get("max_position_embeddings", 4096)
    orig = k.int("rope.scaling.original_context_length", ctx)
    config["original_max_position_embeddings"] = orig
    short = tensors.get("rope_factors_short.weight")
    if short is not None:
        factors = [float(x) for x in short.data.ravel()]
        if len(factors) != rot // 2:
            raise UserError(f"{k.path}: rope_factors_short.weight has {len(factors)} values, "
                            f"expected rope.dimension_count / 2 = {rot // 2}")  # fmt: skip
        # mlx-lm's SuScaledRoPE computes with long_factor and scales q, k by the attention
        # factor of max/orig; llama.cpp uses the short factors up to orig tokens of context.
        config["rope_scaling"] = {"type": "longrope", "long_factor": factors,
                                  "short_factor": factors}  # fmt: skip
        want = meta(k.reader, f"{k.arch}.rope.scaling.attn_factor")
        scale = ctx / orig
        got = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
        if want is not None and abs(float(want) - got) > 1e-4:
            k._bad(
                "rope.scaling.attn_factor", want, f"is not LongRoPE's {got:.6f} for {ctx}/{orig}"
            )
