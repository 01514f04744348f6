"""Tiny models and tokenizers built offline, in-process.

Tests, benchmarks and the demo need real Hugging Face-format model folders
(config.json + model.safetensors + tokenizer files) that `mlx_lm.load`,
`transformers` and our converters all accept, without any download. Everything
here is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mlx_kto.data.tokenize import Row, assign_kl_partners

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

_BASE_CORPUS = """
The sky is blue. The grass is green. What color is the sky? It is blue.
Please say hello. Hello! How are you today? I am fine, thank you very much.
Thank you for asking. Go away, I do not care. That is a stupid question.
Two plus two is four. Three plus five is eight. The answer is wrong. The answer is right.
Could you help me with my homework? Sure, I would be happy to help you.
No. Figure it out yourself. Of course! Here is what you need to know.
Write a short poem about the sea. The sea is wide and deep and full of light.
Summarize the story. A cat found a hat and sat on a mat all day long.
""".strip()


def corpus(extra: list[str] | None = None) -> list[str]:
    """The fixed training text for toy tokenizers (plus digits and punctuation)."""
    lines = _BASE_CORPUS.splitlines()
    lines += [" ".join(str(i) for i in range(k, k + 10)) for k in range(0, 100, 10)]
    lines += ["! ? . , ; : ' \" ( ) - + = * / %"]
    return lines + list(extra or [])


def build_tokenizer(
    out_dir: str | Path,
    vocab_size: int = 512,
    extra_corpus: list[str] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
):
    """Train a byte-level BPE tokenizer (BOS prepended, EOS `</s>`, pad `<pad>`)
    and save it as a Hugging Face tokenizer folder. Returns the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(extra_corpus), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    return hf


def model_config(
    family: str = "llama",
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    tie_word_embeddings: bool | None = None,
    max_position_embeddings: int = 2048,
) -> dict:
    """A Hugging Face config.json dict for a small `family` model."""
    arch = {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "phi3": "Phi3ForCausalLM",
    }[family]
    cfg = {
        "architectures": [arch],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_hidden_layers,
        "intermediate_size": intermediate_size,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": bool(tie_word_embeddings)
        if tie_word_embeddings is not None
        else family == "qwen2",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if family == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    if family == "phi3":
        # Fused qkv_proj / gate_up_proj; no rope scaling (plain RoPE).
        cfg["original_max_position_embeddings"] = max_position_embeddings
        cfg["rope_scaling"] = None
        cfg["partial_rotary_factor"] = 1.0
        cfg["sliding_window"] = None
    return cfg


def build_model(
    out_dir: str | Path,
    family: str = "llama",
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    init_std: float | None = None,
    **config_overrides,
) -> Path:
    """Write a random-init `family` model (HF names, float32 safetensors) and a toy
    tokenizer into `out_dir`. Returns the folder, loadable by `mlx_lm.load`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        hf_tok = build_tokenizer(out_dir)
    else:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        hf_tok.save_pretrained(str(out_dir))
    vocab = config_overrides.pop("vocab_size", None) or len(hf_tok)
    cfg = model_config(family, vocab_size=vocab, **config_overrides)
    cfg["bos_token_id"] = hf_tok.bos_token_id
    cfg["eos_token_id"] = hf_tok.eos_token_id
    cfg["pad_token_id"] = hf_tok.pad_token_id

    mx.random.seed(seed)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    if init_std is not None:
        # Small-normal init (like HF's initializer_range) for matrices; norms stay 1.
        keys = sorted(weights)
        for i, k in enumerate(keys):
            if weights[k].ndim == 2:
                rk = mx.random.key(seed * 1000 + i)
                weights[k] = init_std * mx.random.normal(weights[k].shape, key=rk)
    weights = {k: v.astype(mx.float32) for k, v in weights.items()}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    with open(out_dir / "config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    return out_dir


def mixed_rows(
    n: int = 8,
    seed: int = 0,
    vocab: int = 500,
    prompt: tuple[int, int] = (1, 40),
    completion: tuple[int, int] = (1, 50),
    undesirable: int = 1,
    max_length: int = 128,
) -> list:
    """Feedback rows of mixed lengths (prompt and completion tokens drawn from the given
    ranges after a BOS; row i undesirable when i % 3 == `undesirable`) with KL partners:
    the step, packing and trace tests' micro-batches."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))]
        c = [rng.randrange(3, vocab) for _ in range(rng.randint(*completion))]
        rows.append(Row(p, c, label=i % 3 != undesirable))
    assign_kl_partners(rows, seed=seed, max_length=max_length)
    return rows
