"""GGUF tokenizers built from the file's metadata (mlx_kto.model.gguf_tokenizer, no torch)
against the tokenizers that read the same files elsewhere, token for token, on real files:
SmolLM2's and Gemma 3 270M's released GGUFs, and GGUFs that llama.cpp's own converter
(.ci/llamacpp_convert_venv.sh) makes from real tokenizers (Llama 3.1/3.2, Qwen 3, Mistral's
SentencePiece under a Llama and under a Phi-3).

References: llama.cpp's tokenizer (the runtime the file is made for), transformers' GGUF
tokenizer (needs torch), and, for the converted files, the original tokenizer.json.
Known, documented differences, asserted as such rather than skipped:
- transformers' GGUF reader gives SentencePiece Llama vocabularies (not Gemma's or Phi-3's) a
  Metaspace pre-tokenizer,
  which does not double a leading space (" hi" -> "▁hi") and adds no "▁" after a special
  token ("<s>hi" -> "<s>", "hi"); SentencePiece, llama.cpp, the original tokenizer.json and
  ours give "▁▁hi" and "<s>", "▁hi".
- llama.cpp matches end-of-generation-looking texts such as "</s>" whole even where the file
  types them as normal tokens (Qwen's "</s>" is ordinary text, id 128247); the original
  tokenizer, transformers and ours split such text as the vocabulary says.
"""

import os
import subprocess
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer, read_vocab, tokenizer_dir

import gguf
import numpy as np
import pytest
from assets_gemma3 import gemma3_gguf  # noqa: F401  (fixture)
from assets_smollm2 import smollm2_gguf  # noqa: F401  (fixture)
from assets_tokenizers import CACHE, TOKENIZERS, real_model

CONVERTER = CACHE / "llamacpp_convert"
STRINGS = [
    "What color is the sky? It is blue.",
    "In 2024, 12345 apples cost $3.50 (or 3,50 €).",
    "héllo wörld 你好世界 🙂 مرحبا Привет мир ΕΛΛΗΝΙΚΆ",
    "a  b\n\n  c\t\td   e",
    "  two leading spaces",
    " one leading space",
    "trailing spaces  ",
    "\n\nnewlines first",
    "don't I'm we'll THEY'RE y'all",
    "x" * 40 + " " + "ab" * 20,
    "1234567890 3.14159 1e-5 0x1F",
    "ÀÉÎÕÜ ñ ß ﬁ Ǆ ǅ",
    "\u00a0nbsp\u2003em\u200bzw",
    "tab\tsep\r\nwindows\rmac",
    "emoji 👩‍👩‍👧 flag 🇫🇷 skin 👍🏽",
    "code: def f(x):\n    return x**2  # comment\n\tpass",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "[INST] Why is the sky blue? [/INST] Rayleigh scattering.",
    "<s>bos inside</s> text",
    "",
    " ",
    "\n",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What do cows drink?"},
    {"role": "assistant", "content": "Water, mostly."},
    {"role": "user", "content": "And  cats?\n"},
]


def _convert(name: str, family: str | None, out: Path) -> Path:
    """GGUF of a random-weight model behind real tokenizer `name`, by llama.cpp's converter."""
    if not list(CONVERTER.glob("ready-*")):
        pytest.skip(f"llama.cpp converter venv not in {CONVERTER} (.ci/llamacpp_convert_venv.sh)")
    base = real_model(name, out / "hf", family=family)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(CONVERTER / "venv" / "bin" / "python"), str(CONVERTER / "src" / "convert_hf_to_gguf.py"),
           str(base), "--outfile", str(out / "m.gguf"), "--outtype", "f32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "m.gguf"


CONVERTED = {  # id -> (npm tokenizer, model family over it)
    "llama3_1": ("llama3_1", None),
    "qwen3": ("qwen3", None),
    "mistral": ("llama2", None),
    "phi3": ("llama2", "phi3"),
}


@pytest.fixture(scope="module")
def real_gguf(request, tmp_path_factory, smollm2_gguf, gemma3_gguf):  # noqa: F811
    """(GGUF path, original tokenizer.json or None) for the parametrized case."""
    if request.param == "smollm2":
        return smollm2_gguf, None
    if request.param == "gemma3":
        return gemma3_gguf, None
    name, family = CONVERTED[request.param]
    out = _convert(name, family, tmp_path_factory.mktemp(request.param))
    return out, TOKENIZERS / name / "tokenizer.json"


CASES = ["smollm2", "gemma3", *CONVERTED]


def _type(spec: dict, token: str) -> int:
    return spec["types"][spec["tokens"].index(token)]


def _metaspace(path) -> bool:
    """Whether transformers reads this file with the Metaspace pre-tokenizer (SentencePiece
    vocabularies other than Gemma's and Phi-3's, which it builds like SentencePiece)."""
    spec = read_vocab(path)
    return spec["model"] == "llama" and not spec["arch"].startswith(("gemma", "phi3"))


@pytest.mark.interop
@pytest.mark.parametrize("real_gguf", CASES, indirect=True)
def test_tokens_match_llama_cpp_transformers_and_the_original(real_gguf, tmp_path, monkeypatch):
    path, original = real_gguf
    monkeypatch.setenv("MLX_KTO_CACHE_DIR", str(tmp_path / "cache"))
    ours = load_gguf_tokenizer(path)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    spec = read_vocab(path)
    promoted = [t for t in ("</s>",) if t in spec["tokens"] and _type(spec, t) == 1]
    try:
        for s in STRINGS:
            if any(t in s for t in promoted):  # llama.cpp's EOG heuristic (module docstring)
                continue
            got = ours.encode(s, add_special_tokens=False)
            want = llm.tokenize(s.encode(), add_bos=False, special=True)
            assert got == want, (s, got, want)
            assert ours.encode(s) == llm.tokenize(s.encode(), add_bos=True, special=True), s
            if "<" not in s:  # plain text comes back as it went in
                assert ours.decode(got) == s, (s, ours.decode(got))
        chats = [ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=g)
                 for g in (False, True)] if ours.chat_template else []  # fmt: skip
        for text in chats:  # the chat as llama.cpp reads it (the template's own specials)
            want = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert ours.encode(text, add_special_tokens=False) == want, text
    finally:
        llm.close()
    if original is not None:  # the tokenizer the GGUF was converted from
        from tokenizers import Tokenizer

        orig = Tokenizer.from_file(str(original))
        for s in STRINGS:
            assert (
                ours.encode(s, add_special_tokens=False)
                == orig.encode(s, add_special_tokens=False).ids
            ), s

    pytest.importorskip("torch", reason="transformers reads GGUF tokenizers only with torch")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    spm, differ = _metaspace(path), 0
    for s in STRINGS:
        got, want = ours.encode(s, add_special_tokens=False), hf.encode(s, add_special_tokens=False)
        if spm and (s.startswith(" ") or "<s>" in s):  # the Metaspace difference (docstring):
            differ += got != want  # ours is llama.cpp's and the original's (checked above)
            continue
        assert got == want, (s, got, want)
        assert ours.encode(s) == hf.encode(s), s
    assert differ >= 2 if spm else differ == 0
    assert ours.bos_token == hf.bos_token and ours.eos_token == hf.eos_token
    assert ours.eos_token_id == hf.eos_token_id
    if hf.chat_template:
        assert ours.chat_template == hf.chat_template
        for gen in (False, True):
            text = ours.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
            if not spm:  # (SentencePiece: after "<s>", the Metaspace difference again)
                assert ours.encode(text, add_special_tokens=False) == hf.encode(
                    text, add_special_tokens=False
                )
    else:
        assert ours.chat_template is None


def test_refuses_what_it_cannot_build(tmp_path, monkeypatch):
    """An unknown family or pre-tokenizer, or ids outside the vocabulary: one line naming
    the file and the key, no traceback, nothing cached."""
    monkeypatch.setenv("MLX_KTO_CACHE_DIR", str(tmp_path / "cache"))

    def write(name, **kv):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_tokenizer_model(kv.pop("model", "gpt2"))
        w.add_tokenizer_pre(kv.pop("pre", "default"))
        w.add_token_list(["a", "b", "ab"])
        w.add_token_types([1, 1, 1])
        w.add_token_merges(["a b"])
        if "bos" in kv:
            w.add_bos_token_id(kv.pop("bos"))
        w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return tmp_path / name

    cases = [
        (write("bert.gguf", model="bert"), "tokenizer.ggml.model 'bert' is not supported"),
        (write("pre.gguf", pre="made-up"), "tokenizer.ggml.pre 'made-up'"),
        (write("bos.gguf", bos=7), "tokenizer.ggml.bos_token_id is 7"),
    ]
    for path, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            tokenizer_dir(path)
        assert str(path) in str(e.value)
    assert not list((tmp_path / "cache" / "gguf_tokenizers").iterdir())  # nothing half-made
