"""A real model end to end: SmolLM2-135M-Instruct from the Q4_1 GGUF that llama.cpp runs.
KTO on conversational rows through its ChatML template, the adapter loaded by
`mlx_lm.load(gguf-to-mlx folder, adapter_path=...)`, exported with
`convert to-gguf --base the.gguf` and applied by llama.cpp over the same file."""

import json
import subprocess
import sys
import time

from mlx_kto.config.core import KTOConfig
from mlx_kto.export import to_gguf
from mlx_kto.export.gguf_base import gguf_to_mlx
from mlx_kto.model.gguf import read_config
from mlx_kto.model.load import load_gguf_for_inference, reference_mode
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits
from assets_smollm2 import smollm2_gguf  # noqa: F401  (fixture)
from llama_ref import f32_copy, llama_cpp, llama_logits, random_adapter
from mlx.utils import tree_map
from no_torch import mlx_kto, no_torch_env

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?", "How many legs does a spider have?",
    "What color is the sky on a clear day?", "Name a fruit that is yellow.",
    "What is two plus three?", "Which planet is called the red planet?",
    "What do bees make?", "How many days are in a week?",
]  # fmt: skip
GOOD = "Happy to help! {}"
BAD = "Figure it out yourself."
SYSTEM = "Be brief."
ANSWERS = ["Paris.", "Eight.", "Blue.", "A banana.", "Five.", "Mars.", "Honey.", "Seven."]


def write_chat_feedback(path):
    """Conversational rows (messages + label): polite answers up, rude ones down."""
    with open(path, "w") as f:
        for q, a in zip(QUESTIONS, ANSWERS):
            for good in (True, False):
                reply = GOOD.format(a) if good else BAD
                msgs = [
                    {"role": "system", "content": SYSTEM},  # short rows: a fast test
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": reply},
                ]
                f.write(json.dumps({"messages": msgs, "label": good}) + "\n")
    return path


def test_config_matches_transformers(smollm2_gguf):  # noqa: F811
    """Our metadata -> config mapping agrees with transformers' GGUF config reader."""
    from transformers import AutoConfig

    ours = read_config(smollm2_gguf)
    hf = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "head_dim",
                "max_position_embeddings"):  # fmt: skip
        assert ours[key] == getattr(hf, key), key
    assert ours["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert abs(ours["rms_norm_eps"] - hf.rms_norm_eps) < 1e-12


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_gguf, tmp_path_factory):  # noqa: F811
    """llama.cpp's own float32 dequantization of the Q4_1 file."""
    return f32_copy(smollm2_gguf, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf")


def test_train_export_and_run_in_llama_cpp(smollm2_gguf, smollm2_f32, tmp_path):  # noqa: F811
    """Train 3 steps, export for the same file, and check what any machine reproduces
    (issue 24: no assertion on where a trajectory goes): whatever adapter training made,
    llama.cpp with the exported LoRA computes what MLX computes with the adapter (on
    llama.cpp's float32 copy of the file, to 2e-3); on the Q4_1 file itself llama.cpp's
    8-bit activations keep it close, not equal. A fixed random adapter (a large effect by
    construction) makes the comparisons non-vacuous."""
    llama_cpp()
    from mlx_lm import load

    t0 = time.time()
    data = write_chat_feedback(tmp_path / "feedback.jsonl")
    lines = []
    cfg = KTOConfig(
        model=str(smollm2_gguf), data=str(data), adapter_path=str(tmp_path / "run"),
        iters=3, batch_size=2, max_length=48, learning_rate=3e-3, num_layers=4,
        lora_rank=4, beta=0.5, steps_per_eval=0, steps_per_report=1, quiet=True,
        no_ref_cache=True, seed=0,
    )  # fmt: skip
    res = train(cfg, log=lines.append)
    assert res.steps == 3
    assert any("Q4_1: 210 tensors kept quantized" in m for m in lines), lines
    # The CPU rule (Q4_1 scales are float16): the run trained in float32, the caller's config
    # untouched (train works on its own copy).
    assert json.loads((res.adapter_path / "kto_config.json").read_text())["dtype"] == "float32"
    assert cfg.dtype is None
    losses = [json.loads(x)["loss"] for x in res.metrics_path.read_text().splitlines()[-3:]]
    assert all(np.isfinite(losses))
    t_train = time.time() - t0

    # The chat the tests score: the real ChatML template, tokens as llama.cpp reads them.
    model, tok = load_gguf_for_inference(smollm2_gguf, str(res.adapter_path), log=lambda *_: 0)
    chat = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What do cows drink?"},
    ]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (
        text
        == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat do cows drink?<|im_end|>\n<|im_start|>assistant\n"
    )
    text += GOOD.format("Water.")
    tokens = tok.encode(text, add_special_tokens=False)
    assert tokens[0] == 1  # <|im_start|>

    # mlx_lm.load on the converted folder + our adapter = our GGUF loader + adapter.
    folder = gguf_to_mlx(smollm2_gguf, tmp_path / "smollm2-mlx", dtype="float32", log=lambda *_: 0)
    mlx_model, mlx_tok = load(str(folder), adapter_path=str(res.adapter_path))
    assert mlx_tok.encode(text, add_special_tokens=False) == tokens
    mlx_model.update(
        tree_map(
            lambda v: v.astype(mx.float32) if v.dtype == mx.float16 else v, mlx_model.parameters()
        )
    )  # fmt: skip  (our CPU rule: float32)
    want = logits(model, tokens)
    # mlx-lm's own quantized kernel vs our BLAS-on-dequantized path: summation order only.
    np.testing.assert_allclose(logits(mlx_model, tokens), want, atol=1e-3, rtol=0)
    with reference_mode(model):  # the adapter switched off: the base GGUF model
        want_base = logits(model, tokens)

    # The trained adapter, exported: llama.cpp on the float32 copy = MLX, base and LoRA.
    lora = to_gguf(res.adapter_path, tmp_path / "kto-lora.gguf", base=str(smollm2_gguf))
    np.testing.assert_allclose(llama_logits(smollm2_f32, tokens), want_base, atol=2e-3, rtol=0)
    np.testing.assert_allclose(llama_logits(smollm2_f32, tokens, lora), want, atol=2e-3, rtol=0)

    # A fixed random adapter: a large effect, the same in llama.cpp and MLX.
    src, rmodel, _ = random_adapter(smollm2_gguf, tmp_path / "rand", num_layers=4, size=0.2)
    rlora = to_gguf(src, tmp_path / "rand-lora.gguf", base=str(smollm2_gguf))
    r_want = logits(rmodel, tokens)
    assert np.abs(r_want - want_base).max() > 0.5
    np.testing.assert_allclose(llama_logits(smollm2_f32, tokens, rlora), r_want, atol=2e-3, rtol=0)

    # The Q4_1 file itself: llama.cpp's kernels round activations to 8 bits, MLX computes
    # the dequantized weights exactly: close, not equal; the LoRA's effect likewise.
    got_base, got = llama_logits(smollm2_gguf, tokens), llama_logits(smollm2_gguf, tokens, rlora)
    assert np.abs(got_base - want_base).mean() < 0.5
    assert (got_base.argmax(-1) == want_base.argmax(-1)).mean() > 0.9
    effect_mlx, effect_cpp = r_want - want_base, got - got_base  # measured: 0.11, corr 0.995
    assert np.abs(effect_cpp - effect_mlx).mean() < 0.25 * np.abs(effect_mlx).mean()
    assert np.corrcoef(effect_mlx.ravel(), effect_cpp.ravel())[0, 1] > 0.95
    print(f"train {t_train:.0f}s, total {time.time() - t0:.0f}s")


def test_mlx_computes_the_dequantized_weights_exactly(smollm2_gguf, smollm2_f32):  # noqa: F811
    """MLX on the Q4_1/Q8_0 file = llama.cpp on its own float32 dequantization of the same
    file (llama_model_quantize to ALL_F32) to 1e-3 (measured 1.2e-4): the quantized layers
    hold llama.cpp's exact values, names/config/q-k order are right. llama.cpp's Q4_1
    kernels themselves differ more (8-bit activations), see the test above."""
    model, tok = load_gguf_for_inference(smollm2_gguf, log=lambda *_: 0)
    chat = [{"role": "user", "content": "Why is the sea salty?"},
            {"role": "assistant", "content": "Rivers carry dissolved minerals into it."}]  # fmt: skip
    tokens = tok.encode(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)
    np.testing.assert_allclose(
        llama_logits(smollm2_f32, tokens), logits(model, tokens), atol=1e-3, rtol=0
    )


def test_train_and_export_without_torch(smollm2_gguf, tmp_path):  # noqa: F811
    """README's round trip on a base install (no torch): `mlx-kto train --model FILE.gguf`
    (2 steps) and `mlx-kto convert to-gguf RUN OUT --base FILE.gguf`, as subprocesses."""
    env = no_torch_env(tmp_path)
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util, json, transformers;"
         "print(json.dumps([importlib.util.find_spec('torch') is None,"
         " transformers.utils.is_torch_available()]))"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert probe.returncode == 0 and json.loads(probe.stdout) == [True, False], probe.stderr
    data = write_chat_feedback(tmp_path / "feedback.jsonl")
    run = tmp_path / "run"
    r = mlx_kto("train", "--model", smollm2_gguf, "--data", data, "--adapter-path", run,
                "--iters", 2, "--batch-size", 2, "--max-length", 48, "--num-layers", 2,
                "--lora-rank", 4, "--steps-per-eval", 0, "--no-ref-cache", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "torch" not in r.stderr.lower(), r.stderr[-3000:]
    assert (run / "adapters.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2
    assert any((tmp_path / "cache" / "gguf_tokenizers").iterdir())  # built in that process
    out = tmp_path / "lora.gguf"
    r = mlx_kto("convert", "to-gguf", run, out, "--base", smollm2_gguf, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    from mlx_kto.export import read_lora_file

    lora = read_lora_file(out)
    assert lora.kv["general.type"][1] == "adapter"
    assert sum(n.endswith(".lora_a") for n in lora.tensors) == 2 * 7  # 2 layers x 7 linears
