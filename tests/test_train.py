"""End-to-end training: learning, adapters mlx-lm can load, reference = base, resume, CLI."""

import json
import shutil
import subprocess
import sys

from mlx_kto.cli.app import cli
from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.errors import UserError
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from feedback_fixtures import quick_cfg, write_feedback

# Float32 noise on a sequence log-prob (~-100) between batch shapes, BLAS builds and thread
# counts is ~1e-5; one update of an 8-row batch at lr 1e-4 moves the rewards (beta 0.1) by
# ~2e-2 (margins 2.2e-2, loss 0.5 -> 0.4972 when measured). Assertions sit between the two.
NOISE = 1e-4


@pytest.fixture(scope="module")
def trained(tiny_llama, feedback_dir, tmp_path_factory):
    """A short run (8 steps of 4 rows) with a final eval on valid.jsonl: an adapter that has
    moved, for the tests that need one."""
    out = tmp_path_factory.mktemp("run")
    cfg = quick_cfg(tiny_llama, feedback_dir, out, iters=8, steps_per_save=4)
    return cfg, train(cfg, log=lambda *_: None)


@pytest.fixture(scope="module")
def one_step(tiny_llama, tmp_path_factory):
    """One optimizer step at a small learning rate on one balanced batch (4 desirable and 4
    undesirable rows, weights 1), whose valid split is that same batch.

    Before the step the policy is the reference: every reward is 0 and the loss is 0.5. The
    step follows the gradient of the loss, so to first order in the learning rate it raises
    desirable rewards against undesirable ones and lowers the loss on the batch it saw (the
    KL point z cancels to first order in a balanced batch). Measured: the margin is linear in
    the learning rate to 0.2% up to lr 1e-3, so at 1e-4 the second-order terms are negligible
    and this holds on every machine: no trajectory is involved."""
    d = tmp_path_factory.mktemp("one_batch")
    write_feedback(d / "train.jsonl", 8, seed=0, numbered=True)
    shutil.copy(d / "train.jsonl", d / "valid.jsonl")
    held = write_feedback(tmp_path_factory.mktemp("held") / "held_out.jsonl", 16, seed=1)
    cfg = quick_cfg(
        tiny_llama, d, tmp_path_factory.mktemp("one_step"), iters=1, batch_size=8,
        learning_rate=1e-4, warmup_steps=0, lr_schedule="constant", steps_per_save=0,
    )  # fmt: skip
    return cfg, train(cfg, log=lambda *_: None), held


def _eval(*args) -> dict:
    """`mlx-kto eval ARGS` (in-process) -> the scores it prints."""
    out = CliRunner().invoke(cli, ["eval", *args])
    assert out.exit_code == 0, out.output
    return json.loads(out.output[out.output.index("{") :])


def test_a_step_separates_rewards_on_its_batch_and_on_held_out_rows(one_step):
    _, result, held = one_step
    (first,) = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference before it
    assert abs(first["rewards/margins"]) < 1e-5
    ev = result.eval_metrics  # after the step, on the rows it trained on
    assert ev["loss"] < 0.5 - NOISE, ev
    assert ev["rewards/chosen"] - ev["rewards/rejected"] > NOISE, ev
    assert ev["rewards/margins"] > NOISE, ev
    # Held-out rows (other prompts, the same kinds of reply) move the same way: a first-order
    # effect of one step from fixed weights (measured 80% of the batch's), not a trajectory.
    scores = _eval("--adapter-path", str(result.adapter_path), "--data", str(held))
    assert scores["rows"] == 16 and scores["rewards/margins"] > NOISE, scores


def test_metrics_jsonl_has_every_step(trained):
    cfg, result = trained
    lines = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, cfg.iters + 1))
    for key in (
        "loss",
        "kl",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "peak_memory_gb",
        "ref_forwards",
    ):
        assert key in lines[-1]
    # A side's metrics appear only on steps whose batch had rows of that side.
    assert any("logps/chosen" in r for r in lines) and any("logps/rejected" in r for r in lines)
    # Step 0 has r = 0 for every row, so the first loss is 0.5 (weights 1) up to the first
    # update (that the loss then falls: test_a_step_separates_rewards_on_its_batch...).
    assert abs(lines[0]["loss"] - 0.5) < 1e-5
    assert all(np.isfinite(r["loss"]) for r in lines)


def test_adapter_loads_in_mlx_lm_and_changes_outputs(trained, tiny_llama):
    from mlx_lm import load

    cfg, result = trained
    base, tok = load(str(tiny_llama))
    tuned, _ = load(str(tiny_llama), adapter_path=str(result.adapter_path))
    x = mx.array([tok.encode("Tell me about the sky sea.")])
    diff = mx.abs(base(x) - tuned(x)).max().item()
    assert diff > 1e-3
    conf = json.loads((result.adapter_path / "adapter_config.json").read_text())
    assert conf["lora_parameters"]["rank"] == 4 and conf["lora_parameters"]["scale"] == 2.0


def test_reference_is_base_model(tiny_llama):
    """LoRA switched off (with non-zero LoRA weights) gives exactly the base model."""
    from mlx_kto.model.load import apply_lora, lora_modules, reference_mode
    from mlx_kto.model.logprobs import sequence_logps

    from mlx.utils import tree_flatten
    from mlx_lm import load

    base, tok = load(str(tiny_llama))
    toks = mx.array([tok.encode("The sky is blue. Hello!")] * 2)
    mask = mx.ones(toks.shape, dtype=mx.bool_)
    want = sequence_logps(base, toks, mask)
    model, _ = load(str(tiny_llama))
    apply_lora(model, KTOConfig(lora_dropout=0.5))
    for m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape)
    model.train()
    assert mx.abs(sequence_logps(model, toks, mask) - want).max().item() > 1e-3
    with reference_mode(model):
        got = sequence_logps(model, toks, mask)
    assert mx.allclose(got, want, atol=1e-5)
    assert model.training and all(m.scale == 2.0 for m in lora_modules(model))
    assert len(tree_flatten(model.trainable_parameters())) > 0


def test_resume_continues_exactly(tiny_llama, feedback_dir, tmp_path):
    """Resuming from the step-4 checkpoint of an 8-step run reproduces its final adapter."""
    from mlx_kto.train.checkpoint import list_checkpoints

    straight = train(
        quick_cfg(tiny_llama, feedback_dir, tmp_path / "a", iters=8, steps_per_save=4),
        log=lambda *_: None,
    )
    ckpts = list_checkpoints(tmp_path / "a")
    assert [c.name for c in ckpts] == ["step_0000004", "step_0000008"]
    resumed = train(
        quick_cfg(
            tiny_llama,
            feedback_dir,
            tmp_path / "c",
            iters=8,
            steps_per_save=4,
            resume=str(ckpts[0]),
        ),
        log=lambda *_: None,
    )
    a = mx.load(str(straight.adapter_path / "adapters.safetensors"))
    c = mx.load(str(resumed.adapter_path / "adapters.safetensors"))
    assert a.keys() == c.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(c[k]), atol=1e-5, rtol=1e-4)
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(5, 9))


def test_qwen2_and_apo_zero_with_batch_one(tiny_qwen2, feedback_dir, tmp_path):
    cfg = quick_cfg(
        tiny_qwen2,
        feedback_dir / "train.jsonl",
        tmp_path,
        iters=4,
        batch_size=1,
        loss_type="apo_zero_unpaired",
        grad_checkpoint=True,
        grad_accumulation_steps=2,
    )
    res = train(cfg, log=lambda *_: None)
    assert res.steps == 4 and (tmp_path / "adapters.safetensors").exists()
    assert res.final_metrics["kl"] == 0.0


def test_quantized_base_and_init_adapter(tiny_llama, feedback_dir, trained, tmp_path):
    """QLoRA (8-bit base) trains; starting from an adapter makes that adapter the reference."""
    _, first = trained
    cfg = quick_cfg(tiny_llama, feedback_dir, tmp_path / "q", iters=2, quantize=8, q_group_size=32)
    assert train(cfg, log=lambda *_: None).steps == 2
    cfg = quick_cfg(
        tiny_llama,
        feedback_dir,
        tmp_path / "i",
        iters=1,
        learning_rate=1e-12,
        init_adapter=str(first.adapter_path),
        warmup_steps=0,
    )
    res = train(cfg, log=lambda *_: None)
    # Policy == frozen starting adapter at step 1, so every reward is ~0 even though the adapter is far from base.
    assert abs(res.final_metrics["rewards/chosen"]) < 1e-4
    assert abs(res.final_metrics["loss"] - 0.5) < 1e-4


def test_train_leaves_the_callers_config_unchanged(
    tiny_llama, feedback_dir, trained, tmp_path, monkeypatch
):
    """train() works on its own copy: a starting adapter (its LoRA settings), relative paths
    (made absolute), resuming (model, data and run folder from the checkpoint) change the
    run's config, as kto_config.json shows, never the object the caller passed."""
    import copy
    import dataclasses
    import os

    _, first = trained  # a rank-4 adapter
    monkeypatch.chdir(tmp_path)
    rel_data = os.path.relpath(feedback_dir, tmp_path)
    cfg = quick_cfg(
        tiny_llama, rel_data, "run", iters=2, lora_rank=8, init_adapter=str(first.adapter_path)
    )
    before = copy.deepcopy(cfg)
    train(cfg, log=lambda *_: None)
    assert cfg == before
    saved = json.loads((tmp_path / "run" / "kto_config.json").read_text())
    assert saved["lora_rank"] == 4 and saved["data"] == str(feedback_dir.resolve())

    resume = dataclasses.replace(
        cfg, model=None, data=None, adapter_path=KTOConfig().adapter_path, iters=3,
        resume=str(tmp_path / "run"),
    )  # fmt: skip
    before = copy.deepcopy(resume)
    res = train(resume, log=lambda *_: None)
    assert resume == before and res.steps == 3
    assert res.adapter_path == tmp_path / "run"  # continued in the folder resumed


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"batch_size": 1}, "apo_zero_unpaired"),
        ({"loss_type": "orpo"}, "loss_type"),
        ({"quantize": 7}, "quantize"),
        ({"desirable_weight": "lots"}, "desirable_weight"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        make_config(None, model="m", data="d", **overrides)


def test_yaml_config_and_unknown_field(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("beta: 0.2\nbatch_size: 8\nlora_keys: [self_attn.q_proj]\n")
    cfg = make_config(good, beta=0.3)
    assert cfg.beta == 0.3 and cfg.batch_size == 8 and cfg.lora_keys == ["self_attn.q_proj"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("betta: 0.2\n")
    with pytest.raises(UserError, match="unknown field 'betta'"):
        make_config(bad)
    worse = tmp_path / "worse.yaml"
    worse.write_text("batch_size: many\n")
    with pytest.raises(UserError, match="batch_size"):
        make_config(worse)


def test_cli_errors_are_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b", "label": "maybe"}\n')
    for args, needle in [
        (["train", "--model", str(tiny_llama), "--data", str(bad)], "bad.jsonl:1"),
        (["train", "--model", str(tmp_path / "nope"), "--data", str(bad)], "model"),
        (
            ["train", "--model", str(tiny_llama), "--data", str(bad), "--batch-size", "1"],
            "batch_size",
        ),
    ]:
        p = subprocess.run(
            [sys.executable, "-m", "mlx_kto.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 2, p.stderr
        err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], p.stderr
        assert "Traceback" not in p.stderr


def test_python_m_train_matches_cli_help():
    out = CliRunner().invoke(cli, ["train", "--help"]).output
    for flag in (
        "--beta",
        "--desirable-weight",
        "--resume",
        "--quantize",
        "--grad-checkpoint",
        "-c",
    ):
        assert flag in out
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.train", "--help"], capture_output=True, text=True
    )
    assert p.returncode == 0 and "--beta" in p.stdout


def test_eval_command_equals_the_final_eval_and_scores_the_step(one_step):
    """`mlx-kto eval RUN` scores as the trainer's final eval did (settings from the run's
    kto_config.json), so it shows the step's known direction: margin up, loss down."""
    _, result, _ = one_step
    scores = _eval("--adapter-path", str(result.adapter_path))
    assert scores["rows"] == 8
    for key in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl"):
        assert scores[key] == pytest.approx(result.eval_metrics[key], rel=1e-4, abs=1e-6), key
    assert scores["rewards/margins"] > NOISE and scores["loss"] < 0.5 - NOISE
