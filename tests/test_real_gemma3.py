"""A real Gemma 3 file end to end: gemma-3-270m Q4_K_M (Q5_0 / Q4_K / Q6_K dequantized,
Q8_0 embedding kept quantized, norms stored 1 + w, 18 layers with sliding and global
attention). Trained and exported on a base install without torch, then run by llama.cpp
with the LoRA. The file is fetched by .ci/fetch_gemma3.sh; absent, these tests skip."""

import json

from mlx_kto.export import read_lora_file, to_gguf
from mlx_kto.model.load import load_gguf_for_inference, reference_mode

import numpy as np
import pytest
from adapter_fixtures import logits
from assets_gemma3 import gemma3_gguf  # noqa: F401  (fixture)
from llama_ref import f32_copy, llama_cpp, llama_logits, random_adapter
from no_torch import mlx_kto, no_torch_env

pytestmark = pytest.mark.slow
TEXT = "Question: What do cows drink?\nAnswer: Mostly water, about 100 litres a day."


def feedback(path):
    rows = [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}", "label": good}
            for q, a, good in [("What do cows drink?", "Water.", True),
                               ("What do cows drink?", "Figure it out.", False),
                               ("What is the sky's color?", "Blue.", True),
                               ("What is the sky's color?", "Who cares.", False)]]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_and_export_without_torch(gemma3_gguf, tmp_path):  # noqa: F811
    """`mlx-kto train --model gemma-3-270m-q4_k_m.gguf` (2 steps) and `convert to-gguf
    --base` on an interpreter that cannot import torch; the log says what dequantizing
    costs; llama.cpp loads the LoRA over the same file."""
    env = no_torch_env(tmp_path)
    run = tmp_path / "run"
    r = mlx_kto("train", "--model", gemma3_gguf, "--data", feedback(tmp_path / "f.jsonl"),
                "--adapter-path", run, "--iters", 2, "--batch-size", 2, "--max-length", 32,
                "--num-layers", 2, "--lora-rank", 4, "--steps-per-eval", 0, "--no-ref-cache",
                env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Q4_K: 27 tensors dequantized to floats (gguf-py)" in r.stderr, r.stderr[-3000:]
    assert "in memory" in r.stderr and "Q8_0: 10 tensors kept quantized" in r.stderr
    out = tmp_path / "lora.gguf"
    r = mlx_kto("convert", "to-gguf", run, out, "--base", gemma3_gguf, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    names = set(read_lora_file(out).tensors)
    assert "blk.17.attn_q.weight.lora_a" in names and "blk.16.ffn_down.weight.lora_b" in names
    lc = llama_cpp()
    llm = lc.Llama(model_path=str(gemma3_gguf), lora_path=str(out), n_ctx=64, verbose=False)
    assert len(llm.tokenize(TEXT.encode())) > 5  # loaded with the LoRA (else it raises)
    llm.close()


def test_lora_matches_llama_cpp(gemma3_gguf, tmp_path):  # noqa: F811
    """A fixed random adapter on the real file, exported: llama.cpp on its float32 copy of
    the file computes what MLX computes, base and LoRA (measured without the LoRA: 0.02; the
    rest is mlx-lm's bf16-rounded sqrt(640) embedding scale, 0.2% off llama.cpp's, and
    llama.cpp's fp16-table GELU); the Q4_K_M file itself agrees on the next token."""
    f32 = f32_copy(gemma3_gguf, tmp_path / "gemma3-f32.gguf")
    src, model, tok = random_adapter(gemma3_gguf, tmp_path / "ad", num_layers=2, size=0.05)
    lora = to_gguf(src, tmp_path / "lora.gguf", base=str(gemma3_gguf))
    tokens = tok.encode(TEXT)
    assert tokens[0] == 2  # <bos>, added as the file says
    with reference_mode(model):
        want_base = logits(model, tokens)
    want = logits(model, tokens)
    assert np.abs(want - want_base).max() > 1.0
    np.testing.assert_allclose(llama_logits(f32, tokens), want_base, atol=0.1, rtol=0)
    np.testing.assert_allclose(llama_logits(f32, tokens, lora), want, atol=0.1, rtol=0)
    got_base = llama_logits(gemma3_gguf, tokens)
    assert (got_base.argmax(-1) == want_base.argmax(-1)).mean() > 0.8
    # The loader used for sampling gives the same model.
    same, _ = load_gguf_for_inference(gemma3_gguf, log=lambda *_: 0)
    np.testing.assert_allclose(logits(same, tokens), want_base, atol=1e-3, rtol=0)
