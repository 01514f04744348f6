"""DoRA (--fine-tune-type dora): training with the base as the reference, and export."""

import json

from mlx_kto.config.core import make_config
from mlx_kto.errors import UserError
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from feedback_fixtures import write_feedback


@pytest.fixture(scope="module")
def dora_run(tiny_llama, tmp_path_factory):
    """4 DoRA steps at a small constant learning rate, every one on the same balanced batch
    (4 desirable and 4 undesirable rows): step 2's loss is then the loss of step 1's batch
    after one update along its gradient (see test_train.py's one_step)."""
    d = tmp_path_factory.mktemp("dora_data")
    write_feedback(d / "train.jsonl", 8, seed=0, numbered=True)
    out = tmp_path_factory.mktemp("dora_run")
    cfg = make_config(
        None, model=str(tiny_llama), data=str(d / "train.jsonl"), adapter_path=str(out),
        fine_tune_type="dora", batch_size=8, iters=4, learning_rate=3e-4, lr_schedule="constant",
        lora_rank=4, max_length=64, quiet=True, warmup_steps=0, steps_per_save=0,
        no_ref_cache=True,
    )  # fmt: skip
    return cfg, train(cfg, log=lambda *_: None), d


def test_dora_trains_its_magnitude_and_saves_a_dora_adapter(dora_run):
    cfg, res, _ = dora_run
    conf = json.loads((res.adapter_path / "adapter_config.json").read_text())
    assert conf["fine_tune_type"] == "dora"
    w = mx.load(str(res.adapter_path / "adapters.safetensors"))
    ms = [k for k in w if k.endswith(".m")]
    assert ms and all(k[:-2] + ".lora_a" in w for k in ms)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert abs(lines[0]["loss"] - 0.5) < 1e-5  # policy == reference at the start
    # One small step along the gradient lowers the loss of the batch it saw (first order in
    # the learning rate; measured 0.5 -> 0.482, float noise ~1e-6).
    assert lines[1]["loss"] < lines[0]["loss"] - 1e-4, [r["loss"] for r in lines]


def test_dora_reference_is_the_base_model(dora_run, tiny_llama):
    """The trained magnitude m rescales W x too, so LoRA's 'scale 0' would not give the base:
    the reference must equal the plain base model's log-probs exactly."""
    from mlx_kto.model.load import reference_mode
    from mlx_kto.model.logprobs import sequence_logps

    from mlx_lm import load

    cfg, res, _ = dora_run
    tuned, tok = load(str(tiny_llama), adapter_path=str(res.adapter_path))
    base, _ = load(str(tiny_llama))
    ids = tok.encode("Tell me about the sea 3. Go away, I do not care.")
    tokens = mx.array([ids])
    mask = mx.array([[0] * 8 + [1] * (len(ids) - 8)])
    want = sequence_logps(base, tokens, mask)
    with reference_mode(tuned):
        ref = sequence_logps(tuned, tokens, mask)
    pol = sequence_logps(tuned, tokens, mask)  # restored after the context
    np.testing.assert_allclose(np.array(ref), np.array(want), rtol=0, atol=1e-6)
    assert abs(float(pol[0]) - float(want[0])) > 1e-3
    # Scale 0 alone (no bypass) is not the base once m has moved.
    from mlx_kto.model.load import lora_modules

    for m in lora_modules(tuned):
        m.scale = 0.0
    assert abs(float(sequence_logps(tuned, tokens, mask)[0]) - float(want[0])) > 1e-6


def test_dora_exports_to_peft_and_refuses_gguf(dora_run, tiny_llama, tmp_path):
    from mlx_kto.export.gguf_lora import to_gguf
    from mlx_kto.export.peft import to_peft

    _, res, _ = dora_run
    out = to_peft(res.adapter_path, tmp_path / "peft", base=str(tiny_llama))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["use_dora"] is True
    from safetensors.numpy import load_file

    names = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_magnitude_vector") for k in names)
    with pytest.raises(UserError, match="DoRA"):
        to_gguf(res.adapter_path, tmp_path / "x.gguf", base=str(tiny_llama))


def test_dora_adapter_continues_as_init_adapter(dora_run, tmp_path):
    cfg, res, d = dora_run
    cfg2 = make_config(
        None, model=cfg.model, data=str(d / "train.jsonl"), adapter_path=str(tmp_path / "b"),
        init_adapter=str(res.adapter_path), batch_size=4, iters=2, max_length=64, quiet=True,
        steps_per_save=0, no_ref_cache=True,
    )  # fmt: skip
    res2 = train(cfg2, log=lambda *_: None)
    lines = [json.loads(x) for x in res2.metrics_path.read_text().splitlines()]
    assert abs(lines[0]["loss"] - 0.5) < 1e-5  # the starting DoRA adapter is the reference
    assert (
        json.loads((res2.adapter_path / "adapter_config.json").read_text())["fine_tune_type"]
        == "dora"
    )
