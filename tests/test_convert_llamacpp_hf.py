"""Fused and converted folders keep the source's tokenizer files byte for byte, so
llama.cpp's own convert_hf_to_gguf.py (the copy vendored in the llama-cpp-python sdist,
in its own venv with the transformers 4.x it pins: .ci/llamacpp_convert_venv.sh) converts
fused SentencePiece models: a Mistral-7B-shaped Llama and a Phi-3, both behind Mistral's
real tokenizer.model. Before, fuse re-saved the tokenizer through transformers 5, which
drops tokenizer.model (Phi-3: "Missing tokenizer.model") and names the class
TokenizersBackend (Llama: "Tokenizer class TokenizersBackend does not exist")."""

import json
import os
import subprocess
from pathlib import Path

from mlx_kto.export import fuse, hf_to_mlx
from mlx_kto.export.tokenizer_files import tokenizer_files

import numpy as np
import pytest
from adapter_fixtures import logits, make_adapter
from assets_tokenizers import CACHE, MISTRAL_CHAT_TEMPLATE, real_model

CONVERTER = CACHE / "llamacpp_convert"
TEXT = "The sky is blue. [INST] Why? [/INST] Rayleigh scattering."


def _same_tokenizer_files(src: Path, dst: Path) -> None:
    names = [p.name for p in tokenizer_files(src)]
    assert "tokenizer.model" in names and "tokenizer.json" in names
    assert [p.name for p in tokenizer_files(dst)] == names
    for n in names:
        assert (dst / n).read_bytes() == (src / n).read_bytes(), n
    assert "TokenizersBackend" not in (dst / "tokenizer_config.json").read_text()


def test_hf_to_mlx_and_fuse_carry_the_tokenizer_files(tmp_path):
    base = real_model("llama2", tmp_path / "hf")
    mlx_dir = hf_to_mlx(str(base), tmp_path / "mlx")
    _same_tokenizer_files(base, mlx_dir)
    src, _ = make_adapter(mlx_dir, tmp_path / "ad", num_layers=2, rank=4, scale=2.0)
    fused = fuse(src, tmp_path / "fused")
    _same_tokenizer_files(base, fused)
    # The carried files still load (mlx-lm) and keep the chat template.
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(fused)
    assert tok.chat_template == MISTRAL_CHAT_TEMPLATE


def _convert(hf_dir: Path, out: Path) -> subprocess.CompletedProcess:
    py = CONVERTER / "venv" / "bin" / "python"
    script = CONVERTER / "src" / "convert_hf_to_gguf.py"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(py), str(script), str(hf_dir), "--outfile", str(out), "--outtype", "f32"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.interop
@pytest.mark.parametrize("family", ["mistral", "phi3"])
def test_llamacpp_converts_fused_sentencepiece_model(tmp_path, family):
    if not list(CONVERTER.glob("ready-*")):
        pytest.skip(
            f"llama.cpp converter venv not in {CONVERTER} (run .ci/llamacpp_convert_venv.sh)"
        )
    base = real_model("llama2", tmp_path / "base", family=None if family == "mistral" else family)
    src, model = make_adapter(base, tmp_path / "ad", num_layers=2, rank=4, scale=2.0)
    fused = fuse(src, tmp_path / "fused")
    _same_tokenizer_files(base, fused)

    gguf_path = tmp_path / "fused.gguf"
    proc = _convert(fused, gguf_path)
    assert proc.returncode == 0, proc.stderr[-2000:]

    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    fields = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")
    }
    arch = {"mistral": "llama", "phi3": "phi3"}[family]
    assert fields["general.architecture"] == arch
    assert fields["tokenizer.ggml.model"] == "llama"  # SentencePiece, read from tokenizer.model
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 32000
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["tokenizer.chat_template"] == MISTRAL_CHAT_TEMPLATE
    cfg = json.loads((fused / "config.json").read_text())
    assert fields[f"{arch}.block_count"] == cfg["num_hidden_layers"]

    # llama.cpp tokenizes like the source tokenizer (the vocabulary came through whole).
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(base)).encode(TEXT)
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=True) == want
    llm.close()
    # ... and computes what MLX computes with base + adapter (weights, q/k layout, fused qkv).
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(gguf_path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
        verbose=False, seed=0, type_k=f32, type_v=f32,
    )  # fmt: skip
    llm.eval(want)
    got = np.array(llm.scores[: len(want)], dtype=np.float32)
    llm.close()
    from mlx_lm.utils import load_model

    expect = logits(model, want)
    assert np.abs(expect - logits(load_model(base)[0], want)).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=0)
