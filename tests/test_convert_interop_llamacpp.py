"""Interop with the real consumer: llama.cpp (through llama-cpp-python, built from source
by .ci/interop.sh). A base GGUF of the toy model is written here with the `gguf`
package (the toy BPE tokenizer is unknown to llama.cpp's convert_hf_to_gguf.py, whose
pre-tokenizer hash check would refuse it); our LoRA GGUF is applied with
`Llama(lora_path=...)`, and llama.cpp's logits must match MLX base+adapter.
"""

import json

from mlx_kto.export import to_gguf
from mlx_kto.export.gguf_lora import llama_permute_rows

import gguf
import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits, make_adapter
from mlx_lm import load

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python not installed (CI builds it: .ci/interop.sh)"
)

pytestmark = pytest.mark.interop
TOKENS = [1, 5, 9, 30, 40, 7, 3, 11, 2, 17]
# f32 weights and an f32 KV cache (llama.cpp's default f16 cache alone costs ~7e-4);
# the rest is summation order.
TOL = 1e-4
F32 = 0  # GGML_TYPE_F32


def write_base_gguf(base, out):
    """A float32 GGUF of a toy llama/qwen2 HF folder, laid out like convert_hf_to_gguf.py:
    llama.cpp tensor names, Llama q/k rows permuted, BPE ("gpt2") vocab with merges."""
    cfg = json.loads((base / "config.json").read_text())
    arch = {"llama": "llama", "qwen2": "qwen2"}[cfg["model_type"]]
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
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [None] * cfg["vocab_size"]
    for t, i in {**vocab, **{v: k for k, v in added.items()}}.items():
        tokens[i] = t
    assert None not in tokens
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

    for name, x in sorted(mx.load(str(base / "model.safetensors")).items()):
        x = np.array(x.astype(mx.float32))
        module, _, leaf = name.rpartition(".")
        g = tmap.get_name(module)
        assert g is not None, name
        if arch == "llama" and g.endswith(("attn_q", "attn_k")):
            x = llama_permute_rows(x, n_head if g.endswith("attn_q") else n_kv)
        w.add_tensor(f"{g}.{leaf}", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _llama_logits(model_path, lora_path=None):
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(
        model_path=str(model_path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
        verbose=False, seed=0, type_k=F32, type_v=F32, **kw,
    )  # fmt: skip
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_llama_cpp_applies_our_lora(tiny_llama, tiny_qwen2, tmp_path, family):
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    base_gguf = write_base_gguf(base, tmp_path / "base.gguf")
    src, model = make_adapter(base, tmp_path / "mlx", num_layers=2, rank=4, scale=2.0)
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(base))

    mlx_base, _ = load(str(base))
    want_base, want = logits(mlx_base, TOKENS), logits(model, TOKENS)
    got_base, got = _llama_logits(base_gguf), _llama_logits(base_gguf, lora)

    np.testing.assert_allclose(got_base, want_base, atol=TOL, rtol=0)  # base GGUF is right
    effect_mlx, effect_cpp = want - want_base, got - got_base
    assert np.abs(effect_mlx).max() > 0.1  # the adapter moves the logits clearly
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    corr = np.corrcoef(effect_mlx.ravel(), effect_cpp.ravel())[0, 1]
    assert corr > 0.9999


@pytest.mark.parametrize("outtype,tol", [("f16", 5e-3), ("q8_0", 5e-2)])
def test_llama_cpp_with_compact_lora_types(tiny_llama, tmp_path, outtype, tol):
    """F16 / Q8_0 LoRA tensors: llama.cpp's logits move the same way, within the
    rounding of those types (measured max 5e-4 for f16, 6e-3 for q8_0)."""
    base_gguf = write_base_gguf(tiny_llama, tmp_path / "base.gguf")
    src, model = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2, rank=4, scale=2.0)
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(tiny_llama), outtype=outtype)
    mlx_base, _ = load(str(tiny_llama))
    effect_mlx = logits(model, TOKENS) - logits(mlx_base, TOKENS)
    effect_cpp = _llama_logits(base_gguf, lora) - _llama_logits(base_gguf)
    np.testing.assert_allclose(effect_cpp, effect_mlx, atol=tol, rtol=0)
    assert np.corrcoef(effect_mlx.ravel(), effect_cpp.ravel())[0, 1] > 0.999


def test_unpermuted_lora_is_silently_wrong_in_llama_cpp(tiny_llama, tmp_path):
    """Without the q/k row permutation llama.cpp still loads the file but computes
    something else: this is the silent bug the permutation avoids."""
    base_gguf = write_base_gguf(tiny_llama, tmp_path / "base.gguf")
    src, model = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2, rank=4, scale=2.0,
                              keys=["self_attn.q_proj", "self_attn.k_proj"])  # fmt: skip
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(tiny_llama))
    # Rewrite the same file with B un-permuted.
    r = gguf.GGUFReader(str(lora))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r.fields["adapter.lora.alpha"].contents()))
    mlx = {k: np.array(v) for k, v in mx.load(str(src / "adapters.safetensors")).items()}
    for t in r.tensors:
        data = np.array(t.data)
        if t.name.endswith("lora_b"):
            blk, leaf = t.name.split(".")[1:3]
            proj = {"attn_q": "q_proj", "attn_k": "k_proj"}[leaf]
            data = np.ascontiguousarray(mlx[f"model.layers.{blk}.self_attn.{proj}.lora_b"].T)
        w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    want = logits(model, TOKENS)
    good = _llama_logits(base_gguf, lora)
    bad = _llama_logits(base_gguf, tmp_path / "bad.gguf")
    assert np.abs(good - want).max() < TOL
    assert np.abs(bad - want).max() > 100 * TOL
