"""`convert to-gguf ADAPTER OUT --base model.gguf` against llama.cpp (llama-cpp-python, built
by .ci/interop.sh): llama.cpp runs the base .gguf with our LoRA; MLX runs the same file
(loaded by mlx_kto.model.gguf) with the mlx-lm adapter."""

import json

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.export import to_gguf
from mlx_kto.model.load import adapter_config, apply_lora, load_base, save_adapter

import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits
from toy_gguf import toy_arch_model, write_toy_gguf

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (CI builds it: .ci/interop.sh)"
)

pytestmark = pytest.mark.interop
TOKENS = [1, 5, 9, 30, 40, 7, 3, 11, 2, 17]
F32 = 0  # GGML_TYPE_F32 (KV cache in f32: llama.cpp's f16 cache alone costs ~7e-4)


def random_adapter(gguf_path, out, keys=None, seed=0, num_layers=2):
    """An mlx-lm adapter trained on nothing but with random non-zero lora_b, made on the
    GGUF-loaded model; returns (adapter dir, that model with the adapter, in eval mode)."""
    cfg = KTOConfig(model=str(gguf_path), lora_rank=4, num_layers=num_layers, seed=seed)
    cfg.lora_keys = keys
    cfg.validate()
    model, _, _, _ = load_base(cfg, log=lambda *_: None)
    apply_lora(model, cfg)
    for i, (_, m) in enumerate(model.named_modules()):
        if hasattr(m, "lora_b"):
            m.lora_b = 0.05 * mx.random.normal(m.lora_b.shape, key=mx.random.key(seed * 97 + i))
    model.eval()
    save_adapter(model, out, adapter_config(cfg, str(gguf_path), num_layers))
    return out, model


def llama_logits(model_path, tokens, lora_path=None):
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
        verbose=False, seed=0, type_k=F32, type_v=F32, **kw,
    )  # fmt: skip
    llm.eval(tokens)
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_for_a_float_gguf_matches_llama_cpp(tiny_llama, tiny_qwen2, tmp_path, family):
    """F32 base: llama.cpp and MLX agree to 1e-4 with and without the LoRA (names, shapes
    and the q/k permutation of B consistent with the un-permuted base)."""
    base = write_toy_gguf({"llama": tiny_llama, "qwen2": tiny_qwen2}[family], tmp_path / "b.gguf")
    src, model = random_adapter(base, tmp_path / "ad")
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(base))
    from mlx_kto.model.load import reference_mode

    with reference_mode(model):
        want_base = logits(model, TOKENS)
    want = logits(model, TOKENS)
    got_base, got = llama_logits(base, TOKENS), llama_logits(base, TOKENS, lora)
    np.testing.assert_allclose(got_base, want_base, atol=1e-4, rtol=0)
    assert np.abs(want - want_base).max() > 0.1  # the adapter moves the logits clearly
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# llama.cpp's CPU GELU (Gemma's MLP) looks its input up in an fp16 table
# (ggml-cpu/vec.h GGML_GELU_FP16): ~1e-3 off the exact tanh GELU mlx-lm computes.
ARCH_TOL = {"gemma3": 5e-3, "phi3": 1e-4, "phi4mini": 1e-4, "llama32": 1e-4}
LONG = [1, 5, 9, 30, 40, 7, 3, 11, 2, 17, 44, 100, 20, 60, 70, 80, 90, 33, 21, 12]


@pytest.mark.parametrize("family", list(ARCH_TOL))
def test_architectures_match_llama_cpp_with_and_without_the_lora(tmp_path, family):
    """Gemma 3 (norms stored 1 + w, sliding window 4 and global layers, q/k norms, tied),
    Phi-3 (fused qkv and gate_up: the LoRA goes to attn_qkv / ffn_up as llama.cpp applies
    it), a Phi-4-mini (partial rotary, LongRoPE: llama.cpp's short factors at a context up
    to the original length, with its attention factor) and a Llama 3.2 (rope_freqs from llama3 scaling, mattering within 20 tokens here):
    F32 GGUFs laid out as llama.cpp's converter does, logits against llama.cpp's."""
    base = write_toy_gguf(toy_arch_model(tmp_path / "hf", family), tmp_path / "b.gguf")
    src, model = random_adapter(base, tmp_path / "ad")
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(base))
    from mlx_kto.export import read_lora_file
    from mlx_kto.model.load import reference_mode

    names = set(read_lora_file(lora).tensors)
    if family.startswith("phi"):
        assert {"blk.1.attn_qkv.weight.lora_a", "blk.1.ffn_up.weight.lora_b"} <= names
    with reference_mode(model):
        want_base = logits(model, LONG)
    want = logits(model, LONG)
    got_base, got = llama_logits(base, LONG), llama_logits(base, LONG, lora)
    tol = ARCH_TOL[family]
    np.testing.assert_allclose(got_base, want_base, atol=tol, rtol=0)
    assert np.abs(want - want_base).max() > 0.1  # the adapter moves the logits clearly
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)


def test_lora_for_a_quantized_gguf_moves_llama_cpp_like_mlx(tiny_llama, tmp_path):
    """Q4_1/Q4_0/Q8_0 base: llama.cpp's quantized kernels also quantize the activations
    (Q8), MLX does not, so the logits differ by that rounding; the LoRA's effect agrees.
    Measured: base max |diff| 0.032, effect max |diff| 0.039 (effect up to 1.79), corr 0.9998."""
    types = {"*": "Q4_1", "token_embd.weight": "Q8_0", "attn_v.weight": "Q4_0"}
    base = write_toy_gguf(tiny_llama, tmp_path / "q.gguf", types)
    src, model = random_adapter(base, tmp_path / "ad")
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(base))
    from mlx_kto.model.load import reference_mode

    with reference_mode(model):
        want_base = logits(model, TOKENS)
    want = logits(model, TOKENS)
    got_base, got = llama_logits(base, TOKENS), llama_logits(base, TOKENS, lora)
    effect_mlx, effect_cpp = want - want_base, got - got_base
    corr = np.corrcoef(effect_mlx.ravel(), effect_cpp.ravel())[0, 1]
    np.testing.assert_allclose(got_base, want_base, atol=5e-2, rtol=0)
    np.testing.assert_allclose(effect_cpp, effect_mlx, atol=5e-2, rtol=0)
    assert corr > 0.999


def test_to_gguf_checks_against_the_gguf_file(tiny_llama, tmp_path):
    """The base .gguf decides names and shapes: an adapter for another model is refused,
    and lm_head LoRA on a tied-embedding GGUF (no output.weight) is refused by name."""
    from toy import build_model

    llama = write_toy_gguf(tiny_llama, tmp_path / "l.gguf")
    wide = write_toy_gguf(build_model(tmp_path / "w", hidden_size=128), tmp_path / "w.gguf")
    src, _ = random_adapter(llama, tmp_path / "ad")
    with pytest.raises(UserError, match="does not fit base"):
        to_gguf(src, tmp_path / "x.gguf", base=str(wide))
    tied = write_toy_gguf(
        build_model(tmp_path / "t", tie_word_embeddings=True), tmp_path / "t.gguf"
    )
    src, _ = random_adapter(llama, tmp_path / "ad2", keys=["lm_head"], num_layers=-1)
    with pytest.raises(UserError, match="'lm_head' is not a module of the base"):
        to_gguf(src, tmp_path / "y.gguf", base=str(tied))
    conf = json.loads((src / "adapter_config.json").read_text())
    assert conf["model"] == str(llama)
