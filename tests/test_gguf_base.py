"""GGUF base models in (mlx_kto.model.gguf): toy GGUF files written here with gguf-py,
laid out like llama.cpp's converter, in every type class the loader distinguishes."""

import json
import subprocess
import sys

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.export.gguf_lora import llama_unpermute_rows
from mlx_kto.model.gguf import load_gguf, pack_native, read_gguf
from mlx_kto.model.load import load_base
from mlx_kto.reference.fingerprint import weights_digest

import gguf
import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits
from mlx_lm import load
from toy_gguf import write_toy_gguf

TOKENS = [1, 5, 9, 30, 40, 7, 3, 11, 2, 17]
QUANT = {"*": "Q4_1", "token_embd.weight": "Q8_0", "attn_v.weight": "Q4_0"}
quiet = lambda *_: None  # noqa: E731


def dequantized_reference(gguf_path, base_dir):
    """The toy model with every weight replaced by gguf-py's exact dequantization of the
    GGUF tensor (q/k rows un-permuted): what a correct loader must compute."""
    model, _ = load(str(base_dir))
    cfg = json.loads((base_dir / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    by_gguf = {}
    for name in dict(mx.load(str(base_dir / "model.safetensors"))):
        module, _, leaf = name.rpartition(".")
        by_gguf[f"{tmap.get_name(module)}.{leaf}"] = name
    new = []
    for t in gguf.GGUFReader(str(gguf_path)).tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if "attn_q." in t.name or "attn_k." in t.name:
            heads = cfg["num_attention_heads" if "attn_q." in t.name else "num_key_value_heads"]
            x = llama_unpermute_rows(x, heads)
        new.append((by_gguf[t.name], mx.array(x)))
    model.load_weights(new)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_float_gguf_is_the_hf_model(tiny_llama, tiny_qwen2, tmp_path, family):
    """An F32 GGUF gives exactly the Hugging Face model's logits: names, config and the
    Llama q/k un-permutation are right (a wrong permutation changes every logit)."""
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2}[family]
    path = write_toy_gguf(base, tmp_path / "m.gguf")
    model, tok, config = load_gguf(path, log=quiet)
    ref, ref_tok = load(str(base))
    np.testing.assert_array_equal(logits(model, TOKENS), logits(ref, TOKENS))
    hf = json.loads((base / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "rope_theta", "tie_word_embeddings"):
        assert config[key] == hf[key], key
    text = "What color is the sky? It is blue."
    assert tok.encode(text, add_special_tokens=False) == ref_tok.encode(
        text, add_special_tokens=False
    )
    assert tok.eos_token_id == ref_tok.eos_token_id
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert tok.apply_chat_template(chat, tokenize=False) == ref_tok.apply_chat_template(
        chat, tokenize=False
    )


def test_q4_q8_stay_quantized_bit_for_bit(tiny_llama, tmp_path):
    """Q4_0/Q4_1/Q8_0 become MLX QuantizedLinear/QuantizedEmbedding (group 32) whose
    dequantized weights are gguf-py's dequantization exactly; logits match that float model."""
    path = write_toy_gguf(tiny_llama, tmp_path / "q.gguf", QUANT)
    lines = []
    model, _, config = load_gguf(path, log=lines.append)
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj).__name__ == "QuantizedLinear" and attn.q_proj.group_size == 32
    assert type(model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert any("Q4_1" in m and "kept quantized" in m for m in lines), lines
    ref = dequantized_reference(path, tiny_llama)
    for mod, want in [(attn.q_proj, ref.model.layers[0].self_attn.q_proj),
                      (attn.v_proj, ref.model.layers[0].self_attn.v_proj),
                      (model.model.embed_tokens, ref.model.embed_tokens)]:  # fmt: skip
        s, b = mod.scales.astype(mx.float32), mod.biases.astype(mx.float32)  # exact in fp32
        w = mx.dequantize(mod.weight, s, b, group_size=32, bits=mod.bits)
        np.testing.assert_array_equal(np.array(w), np.array(want.weight))
    # Computed in float32 (the CPU rule of load_base), the quantized kernels agree with the
    # float model of the same values up to summation order.
    model32, _, _, _ = load_base(KTOConfig(model=str(path)), log=quiet)
    np.testing.assert_allclose(logits(model32, TOKENS), logits(ref, TOKENS), atol=2e-5, rtol=0)


def test_pack_native_matches_mlx_loader(tiny_llama, tmp_path):
    """The gguf-py repacking used for files MLX cannot read is mx.load's layout exactly."""
    path = write_toy_gguf(tiny_llama, tmp_path / "q.gguf", QUANT)
    loaded = mx.load(str(path))
    seen = set()
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type.name in ("Q4_0", "Q4_1", "Q8_0"):
            seen.add(t.tensor_type.name)
            stem = t.name[: -len(".weight")]
            w, s, b = pack_native(np.asarray(t.data), t.tensor_type.name)
            np.testing.assert_array_equal(w, np.array(loaded[t.name]))
            np.testing.assert_array_equal(s, np.array(loaded[f"{stem}.scales"]))
            np.testing.assert_array_equal(b, np.array(loaded[f"{stem}.biases"]))
    assert seen == {"Q4_0", "Q4_1", "Q8_0"}


def test_types_mlx_cannot_read_are_dequantized(tmp_path):
    """Q5_0 makes mx.load refuse the whole file: every tensor then comes through gguf-py
    (Q4_1 still packed, Q5_0 and Q6_K dequantized exactly), and the log says so."""
    from toy import build_model

    base = build_model(tmp_path / "wide", hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    types = {"*": "Q4_1", "ffn_down.weight": "Q5_0", "ffn_up.weight": "Q6_K",
             "attn_output.weight": "BF16"}  # fmt: skip
    path = write_toy_gguf(base, tmp_path / "k.gguf", types)
    with pytest.raises(RuntimeError, match="load_gguf"):  # MLX's loader cannot read this file
        mx.load(str(path))
    lines = []
    model, _, config = load_gguf(path, log=lines.append)
    assert any(m.startswith("k.gguf: Q6_K") and "dequantized" in m for m in lines), lines
    assert any(m.startswith("k.gguf: Q5_0") and "dequantized" in m for m in lines), lines
    mlp = model.model.layers[1].mlp
    assert type(mlp.gate_proj).__name__ == "QuantizedLinear"
    assert type(mlp.up_proj).__name__ == "Linear" and mlp.up_proj.weight.dtype == mx.float32
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == mx.bfloat16  # as stored
    ref = dequantized_reference(path, base)
    np.testing.assert_array_equal(
        np.array(mlp.up_proj.weight), np.array(ref.model.layers[1].mlp.up_proj.weight)
    )
    model32, _, _, _ = load_base(KTOConfig(model=str(path)), log=quiet)
    np.testing.assert_allclose(logits(model32, TOKENS), logits(ref, TOKENS), atol=2e-5, rtol=0)

    # The log says what dequantizing costs: the Q6_K tensors as float32 take 4 / (210/256)
    # times their bytes in the file.
    q6 = next(m for m in lines if m.startswith("k.gguf: Q6_K"))
    assert "in the file" in q6 and "in memory" in q6, q6
    # Re-quantizing touches only the dequantized layers, and says what it saved.
    lines = []
    model, _, config = load_gguf(path, quantize=8, q_group_size=64, log=lines.append)
    (req,) = [m for m in lines if "re-quantized" in m]
    before, after = (float(x.split()[0]) for x in req.split("weights ")[1].split(" -> "))
    assert "MLX 8-bit" in req and after < before, req
    assert type(model.model.layers[1].mlp.up_proj).__name__ == "QuantizedLinear"
    assert model.model.layers[1].mlp.up_proj.bits == 8
    assert model.model.layers[1].mlp.gate_proj.bits == 4  # the Q4_1 layer is untouched
    assert config["quantization"]["model.layers.1.mlp.up_proj"]["bits"] == 8


def test_refuses_what_cannot_be_mapped(tiny_llama, tmp_path):
    extra = [("rope_freqs.weight", np.ones(8, dtype=np.float32))]
    path = write_toy_gguf(tiny_llama, tmp_path / "r.gguf", extra=extra)
    with pytest.raises(UserError, match="rope_freqs.weight"):
        read_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="architecture 'gemma2' is not supported"):
        read_gguf(tmp_path / "g.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(UserError, match="junk.gguf: not a readable GGUF"):
        read_gguf(tmp_path / "junk.gguf")
    with pytest.raises(UserError, match="no such GGUF file"):
        load_base(KTOConfig(model=str(tmp_path / "missing.gguf")))


def test_fingerprint_covers_the_gguf_bytes(tiny_llama, tmp_path):
    a = write_toy_gguf(tiny_llama, tmp_path / "a.gguf", QUANT)
    b = write_toy_gguf(tiny_llama, tmp_path / "b.gguf", QUANT)
    c = write_toy_gguf(tiny_llama, tmp_path / "c.gguf", {**QUANT, "attn_v.weight": "Q8_0"})
    assert weights_digest(a) == weights_digest(b)  # same bytes, other path: same
    assert weights_digest(a) != weights_digest(c)


def test_load_base_and_cpu_float32_rule(tiny_llama, tmp_path):
    """--model FILE.gguf through load_base; on the CPU device the float16 scales/biases and
    norms compute in float32 (cfg.dtype set, said once), --dtype keeps its choice."""
    path = write_toy_gguf(tiny_llama, tmp_path / "q.gguf", {**QUANT, "attn_k.weight": "F16"})
    lines = []
    cfg = KTOConfig(model=str(path))
    model, tok, mpath, _ = load_base(cfg, log=lines.append)
    assert mpath == path and cfg.dtype == "float32"
    assert sum("computing in float32" in m for m in lines) == 1
    q = model.model.layers[0].self_attn.q_proj
    assert q.scales.dtype == mx.float32 and q.weight.dtype == mx.uint32
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == mx.float32
    cfg16 = KTOConfig(model=str(path), dtype="float16")
    model16, _, _, _ = load_base(cfg16, log=lines.append)
    assert model16.model.layers[0].self_attn.q_proj.scales.dtype == mx.float16
    assert cfg16.dtype == "float16"


def test_gguf_to_mlx_folder_loads_in_mlx_lm(tiny_llama, tmp_path):
    path = write_toy_gguf(tiny_llama, tmp_path / "q.gguf", QUANT)
    out = tmp_path / "mlx"
    r = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "convert", "gguf-to-mlx", str(path), str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Q4_1: " in r.stderr and "kept quantized" in r.stderr
    folder_model, tok = load(str(out))
    gguf_model, _, _ = load_gguf(path, log=quiet)
    np.testing.assert_array_equal(logits(folder_model, TOKENS), logits(gguf_model, TOKENS))
    assert type(folder_model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert tok.chat_template
    r = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "convert", "gguf-to-mlx", str(path), str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "not empty" in r.stderr


def test_cli_generate_and_data_check_take_a_gguf(tiny_llama, tmp_path):
    """`generate --model FILE.gguf` prints what the HF folder it was made from prints;
    `data check --model FILE.gguf` tokenizes with the GGUF's tokenizer."""
    from mlx_kto.cli.app import cli

    from click.testing import CliRunner

    path = write_toy_gguf(tiny_llama, tmp_path / "m.gguf")
    runner = CliRunner()
    args = ["generate", "--model", str(path), "--prompt", "What color is the sky?",
            "--max-tokens", "8"]  # fmt: skip
    r = runner.invoke(cli, args)
    assert r.exit_code == 0, r.output
    ref = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *args[:2], str(tiny_llama), *args[3:]],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.stdout.strip() == ref.stdout.strip()  # the GGUF is the same model
    data = tmp_path / "d.jsonl"
    row = {"prompt": "What color is the sky?", "completion": " It is blue.", "label": True}
    data.write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": False}) + "\n")
    r = runner.invoke(cli, ["data", "check", str(data), "--model", str(path)])
    assert r.exit_code == 0 and "tokens before truncation: prompt median 7" in r.output, r.output


def rewrite_kv(src, dst, changes: dict):
    """A copy of GGUF `src` with some KVs changed: key -> (value, GGUFValueType[, sub type])
    or None to drop the key; tensors copied as stored."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if key in changes:
            if changes[key] is not None:
                w.add_key_value(key, *changes[key])
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), f.types[0], sub)
    for key, change in changes.items():
        if key not in r.fields and change is not None:
            w.add_key_value(key, *change)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("family", ["gemma3", "phi3", "llama32"])
def test_architectures_load_as_their_mlx_lm_model(tmp_path, family):
    """Gemma 3, Phi-3 and Llama 3.2 GGUFs (laid out as llama.cpp's converter does) give
    exactly the logits of the Hugging Face folder they were written from (mlx_lm.load):
    names, norm offsets, fused tensors, q/k order and the rope scaling are right."""
    from toy_gguf import toy_arch_model

    base = toy_arch_model(tmp_path / "hf", family)
    path = write_toy_gguf(base, tmp_path / "m.gguf")
    model, _, config = load_gguf(path, log=quiet)
    ref, _ = load(str(base))
    long = TOKENS + [44, 100, 20, 60, 70, 80, 90, 33, 21, 12]
    np.testing.assert_array_equal(logits(model, long), logits(ref, long))
    hf = json.loads((base / "config.json").read_text())
    keys = {"gemma3": ("sliding_window", "sliding_window_pattern", "rope_local_base_freq",
                       "query_pre_attn_scalar", "head_dim", "tie_word_embeddings"),
            "phi3": ("original_max_position_embeddings", "partial_rotary_factor",
                     "tie_word_embeddings"),
            "llama32": ("tie_word_embeddings",)}[family]  # fmt: skip
    for key in keys:
        assert config[key] == hf[key], key
    if family == "llama32":
        fit, want = config["rope_scaling"], hf["rope_scaling"]
        assert fit["rope_type"] == "llama3" and fit["factor"] == want["factor"]
        # Only low/orig and high/orig are determined by the factors.
        for k in ("low_freq_factor", "high_freq_factor"):
            ratio = fit[k] / fit["original_max_position_embeddings"]
            assert ratio == pytest.approx(want[k] / want["original_max_position_embeddings"])


@pytest.mark.parametrize("family", ["gemma3", "phi3", "llama32"])
def test_architectures_train_and_export_for_the_same_file(tmp_path, family):
    """`mlx-kto train --model FILE.gguf` (2 steps) and `convert to-gguf --base FILE.gguf`,
    as a user runs them; the LoRA names the file's own tensors (Phi-3: attn_qkv, ffn_up)."""
    from mlx_kto.export import read_lora_file

    from toy_gguf import toy_arch_model

    path = write_toy_gguf(toy_arch_model(tmp_path / "hf", family), tmp_path / "m.gguf")
    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"What color is the sky? {i}", "completion": " It is blue.",
             "label": i % 2 == 0} for i in range(8)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "mlx_kto.cli"]
    r = subprocess.run(
        [*cli, "train", "--model", str(path), "--data", str(data), "--adapter-path", str(run),
         "--iters", "2", "--batch-size", "2", "--num-layers", "2", "--steps-per-eval", "0",
         "--no-ref-cache"], capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([*cli, "convert", "to-gguf", str(run), str(tmp_path / "l.gguf"),
                        "--base", str(path)], capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    names = set(read_lora_file(tmp_path / "l.gguf").tensors)
    n = json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"]
    want = {"phi3": ["attn_qkv", "attn_output", "ffn_up", "ffn_down"]}.get(
        family, ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    )
    assert names == {f"blk.{b}.{t}.weight.lora_{ab}" for b in (n - 2, n - 1) for t in want
                     for ab in "ab"}  # fmt: skip


BAD_HEADERS = [  # (key, (value, type), what the line says)
    ("llama.attention.head_count", (0, gguf.GGUFValueType.UINT32), "= 0 is impossible"),
    ("llama.attention.head_count_kv", (3, gguf.GGUFValueType.UINT32), "does not divide"),
    ("llama.block_count", (0, gguf.GGUFValueType.UINT32), "= 0 is impossible"),
    ("llama.embedding_length", ("64", gguf.GGUFValueType.STRING), "is not an integer"),
    ("llama.attention.layer_norm_rms_epsilon", (-1.0, gguf.GGUFValueType.FLOAT32),
     "is impossible"),
    ("llama.rope.freq_base", (float("nan"), gguf.GGUFValueType.FLOAT32), "not a finite"),
    ("llama.attention.head_count", ([4, 4], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
     "per-layer list"),
    ("llama.feed_forward_length", None, "has no llama.feed_forward_length"),
]  # fmt: skip


@pytest.mark.parametrize(
    "key,change,msg", BAD_HEADERS, ids=[b[0] + str(i) for i, b in enumerate(BAD_HEADERS)]
)
def test_impossible_header_values_are_one_line(tiny_llama, tmp_path, key, change, msg):
    """Issue 24: a GGUF whose head_count is 0 (or any impossible header value) ends train and
    cache warm with one line naming the file and the key, exit 2, no traceback."""
    good = write_toy_gguf(tiny_llama, tmp_path / "good.gguf")
    bad = rewrite_kv(good, tmp_path / "bad.gguf", {key: change})
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "completion": " there", "label": True}) + "\n")
    for cmd in (["train", "--model", str(bad), "--data", str(data), "--adapter-path",
                 str(tmp_path / "run")],
                ["cache", "warm", "--model", str(bad), "--data", str(data), "--ref-cache",
                 str(tmp_path / "cache")]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "mlx_kto.cli", *cmd], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 2, r.stderr[-2000:]
        assert "Traceback" not in r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("error: ") and str(bad) in line and msg in line, line
        assert key.rpartition(".")[2] in line
    assert not (tmp_path / "run" / "adapters.safetensors").exists()
