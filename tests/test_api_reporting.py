"""The Python API (KTOTrainer, callbacks), TRL log keys, loggers, progress output."""

import copy
import dataclasses
import json
import sys
import types

from mlx_kto.config.core import make_config
from mlx_kto.errors import UserError

import mlx.core as mx
import numpy as np
import pytest

GOOD = [" Sure, I would be happy to help you.", " Of course! Here is what you need to know."]
BAD = [" Go away, I do not care.", " No. Figure it out yourself."]


def rows(n, seed=0):
    out = []
    for i in range(n):
        good = i % 2 == 0
        out.append(
            {
                "prompt": f"Tell me about the sky {i + 100 * seed}.",
                "completion": (GOOD if good else BAD)[i % 4 // 2],
                "label": good,
            }
        )
    return out


ARGS = dict(
    batch_size=4, iters=6, learning_rate=2e-3, lora_rank=4, lora_alpha=8.0, max_length=64,
    steps_per_eval=3, steps_per_save=3, quiet=True, seed=0, warmup_steps=1, steps_per_report=2,
)  # fmt: skip


def _write(path, rs):
    path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    return path


def test_trainer_api_callbacks_and_same_adapter_as_the_cli(tiny_llama, tmp_path):
    from mlx_kto import KTOTrainer
    from mlx_kto.train.run import train

    from mlx_lm import load

    steps, evals, saves = [], [], []
    model, tok = load(str(tiny_llama))
    trainer = KTOTrainer(
        model, tok, train_dataset=rows(16), eval_dataset=rows(8, seed=1),
        args={**ARGS, "adapter_path": str(tmp_path / "api")}, model_path=tiny_llama,
        on_step=steps.append, on_eval=lambda s, m: evals.append((s, m)),
        on_save=lambda s, p: saves.append(s), log=lambda *_: None,
    )  # fmt: skip
    result = trainer.train()
    assert result.steps == 6 and [r["step"] for r in steps] == list(range(1, 7))
    assert [s for s, _ in evals] == [3, 6, 6]  # mid-run at 3 and 6, then the final eval
    assert "rewards/margins" in evals[-1][1] and result.eval_metrics == evals[-1][1]
    assert saves == [3, 6]
    ev = trainer.evaluate()
    assert ev["rewards/margins"] == pytest.approx(result.eval_metrics["rewards/margins"], abs=1e-4)

    # The CLI path (files, load_base) runs the same train_model: the same adapter.
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", rows(16))
    _write(d / "valid.jsonl", rows(8, seed=1))
    cfg = make_config(
        None, **ARGS, model=str(tiny_llama), data=str(d), adapter_path=str(tmp_path / "cli")
    )
    train(cfg, log=lambda *_: None)
    a = mx.load(str(tmp_path / "api" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "cli" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def test_trainer_resumes_a_cli_run_from_python(tiny_llama, tmp_path):
    """KTOTrainer.train(resume=CHECKPOINT) continues a run the CLI's train() wrote: the
    checkpoint's settings (args sets none of them), its adapter and data position, the same
    rows given in memory: the adapter of the uninterrupted run. A changed setting in args
    wins over the checkpoint's, and the resume check then refuses it in one line."""
    from mlx_kto.api import KTOTrainer
    from mlx_kto.train.run import train

    from mlx_lm import load

    data = _write(tmp_path / "train.jsonl", rows(16))
    args = {**ARGS, "steps_per_eval": 0}
    cfg = make_config(None, **args, model=str(tiny_llama), data=str(data))
    cfg = dataclasses.replace(cfg, adapter_path=str(tmp_path / "cli"))
    straight = train(cfg, log=lambda *_: None)
    ckpt = tmp_path / "cli" / "checkpoints" / "step_0000003"

    model, tok = load(str(tiny_llama))
    trainer = KTOTrainer(
        model, tok, train_dataset=rows(16), args={"adapter_path": str(tmp_path / "py")},
        log=lambda *_: None,
    )  # fmt: skip
    res = trainer.train(resume=str(ckpt))
    assert res.steps == 6 and res.adapter_path == tmp_path / "py"
    steps = [json.loads(x)["step"] for x in res.metrics_path.read_text().splitlines()]
    assert steps == [4, 5, 6]
    a = mx.load(str(straight.adapter_path / "adapters.safetensors"))
    b = mx.load(str(res.adapter_path / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(np.array(b[k]), np.array(a[k]), atol=1e-5, rtol=1e-4)

    model, tok = load(str(tiny_llama))
    changed = KTOTrainer(
        model, tok, train_dataset=rows(16), args={"beta": 0.3, "adapter_path": str(tmp_path / "b")},
        log=lambda *_: None,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"trained with another setup: beta 0.1 -> 0.3"):
        changed.train(resume_from_checkpoint=str(ckpt))


def test_trainer_takes_a_datasets_dataset(tiny_llama, tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extra")
    from mlx_kto.api import KTOTrainer

    from mlx_lm import load

    model, tok = load(str(tiny_llama))
    ds = datasets.Dataset.from_list(rows(8))
    args = {**ARGS, "iters": 2, "steps_per_eval": 0, "adapter_path": str(tmp_path / "ds")}
    trainer = KTOTrainer(model, tok, train_dataset=ds, args=args, log=lambda *_: None)
    before = copy.deepcopy(trainer.args)
    res = trainer.train()  # no model_path: the reference cache is off for this run only
    assert res.steps == 2 and (tmp_path / "ds" / "adapters.safetensors").exists()
    assert trainer.args == before and not trainer.args.no_ref_cache
    with pytest.raises(UserError, match=r"train_dataset\[1\]: label"):
        KTOTrainer(
            model,
            tok,
            train_dataset=[rows(1)[0], {"prompt": "a", "completion": "b", "label": "?"}],
            args=args,
        )


def test_metrics_records_trl_keys_per_step_ref_counts_and_plain_progress(tiny_llama, tmp_path):
    from mlx_kto.train.run import train

    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", rows(16))
    _write(d / "valid.jsonl", rows(8, seed=1))
    cfg = make_config(
        None, **{**ARGS, "quiet": False}, model=str(tiny_llama), data=str(d),
        adapter_path=str(tmp_path / "run"),
    )  # fmt: skip
    logs = []
    res = train(cfg, log=logs.append)  # pytest's stdout is not a terminal: plain lines
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert [r["num_tokens"] for r in lines] == list(np.cumsum([r["tokens"] for r in lines]))
    for r in lines:
        assert r["ref_hits"] + r["ref_misses"] == 2 * 4  # this step's 4 rows + 4 KL sequences
    # Running totals also count the mid-run evaluation at step 3 (8 valid rows + 8 KL).
    last = lines[-1]
    assert last["ref_hits_total"] + last["ref_misses_total"] == 6 * 8 + 2 * 8
    step_lines = [m for m in logs if m.startswith("step ")]
    assert [m.split()[1] for m in step_lines] == ["2/6", "4/6", "6/6"]
    assert all(m.count("tok/s") == 1 and "tok/s (last 2 steps)" in m for m in step_lines)
    assert sum(m.startswith("eval @ ") for m in logs) == 2


def test_mid_run_eval_is_written_above_the_bar(tiny_llama, tmp_path, monkeypatch, capsys):
    from mlx_kto.train.run import train

    monkeypatch.setattr("mlx_kto.train.loop.show_bar", lambda: True)  # as on a terminal
    d = tmp_path / "data"
    d.mkdir()
    _write(d / "train.jsonl", rows(8))
    _write(d / "valid.jsonl", rows(4, seed=1))
    cfg = make_config(
        None, **{**ARGS, "quiet": False, "iters": 3, "steps_per_save": 0}, model=str(tiny_llama),
        data=str(d), adapter_path=str(tmp_path / "run"),
    )  # fmt: skip
    logs = []
    train(cfg, log=logs.append)
    err = capsys.readouterr()
    assert "eval @ 3:" in err.out + err.err  # tqdm.write, not lost behind the bar
    assert not any(m.startswith("step ") for m in logs)


class FakeRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_logs_trl_keys_offline_without_a_key(tmp_path, monkeypatch):
    from mlx_kto.train.callbacks import CallbackList, make_reporters

    run, inits = FakeRun(), []
    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = make_config(
        None, report_to="wandb", project_name="proj", adapter_path=str(tmp_path / "r")
    )
    notes = []
    cb = CallbackList(make_reporters(cfg, tmp_path / "r", notes.append))
    assert inits[0]["mode"] == "offline" and inits[0]["project"] == "proj"
    assert inits[0]["name"] == "r" and "offline" in notes[0]
    cb.on_step({"step": 1, "loss": 0.5, "lr": 1e-4, "epoch": 0.25, "rewards/chosen": 0.1})
    cb.on_eval(1, {"loss": 0.4})
    cb.close()
    (s1, d1), (s2, d2) = run.logged
    assert s1 == 1 and d1 == {
        "train/loss": 0.5, "train/learning_rate": 1e-4, "train/epoch": 0.25,
        "train/rewards/chosen": 0.1,
    }  # fmt: skip
    assert d2 == {"eval/loss": 0.4} and run.finished
    monkeypatch.setenv("WANDB_API_KEY", "x")
    make_reporters(cfg, tmp_path / "r", notes.append)
    assert inits[1]["mode"] is None


def test_tensorboard_writer_and_missing_package_message(tmp_path, monkeypatch):
    import mlx_kto.train.callbacks as rep

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("dir", logdir))

        def add_scalar(self, k, v, step):
            calls.append((k, v, step))

        def flush(self):
            pass

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(rep, "_summary_writer", lambda: Writer)
    cfg = make_config(None, report_to="tensorboard", run_name="exp1")
    (tb,) = rep.make_reporters(cfg, tmp_path, lambda *_: None)
    tb.on_step({"step": 2, "loss": 0.3, "kl": 0.0})
    tb.close()
    assert calls[0] == ("dir", str(tmp_path / "runs" / "exp1"))
    assert ("train/loss", 0.3, 2) in calls and calls[-1] == "closed"
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match="tensorboardX"):
        rep.make_reporters(cfg, tmp_path, lambda *_: None)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_grad_checkpoint_turns_off_the_cpu_fast_paths(
    tiny_llama, tmp_path, monkeypatch, checkpoint
):
    """Row streams and fastops keep per-block activations alive, which defeats gradient
    checkpointing: a checkpointed run uses one stream and MLX's own ops (the environment
    variables still override)."""
    from mlx_kto import KTOTrainer
    from mlx_kto.runtime import fastops
    from mlx_kto.runtime.streams import active_streams

    from mlx_lm import load

    monkeypatch.delenv("MLX_KTO_CPU_STREAMS", raising=False)
    monkeypatch.delenv("MLX_KTO_FAST_EXP", raising=False)
    monkeypatch.setattr("mlx_kto.runtime.streams.default_streams", lambda: 2)
    seen, lines = [], []
    model, tok = load(str(tiny_llama))
    KTOTrainer(
        model, tok, train_dataset=rows(8),
        args={**ARGS, "iters": 2, "steps_per_eval": 0, "steps_per_save": 0,
              "grad_checkpoint": checkpoint, "adapter_path": str(tmp_path / "run")},
        model_path=tiny_llama, on_step=lambda r: seen.append((active_streams(), fastops.active())), log=lines.append,
    ).train()  # fmt: skip
    # (0, False): no row-parallel context at all, MLX's own attention and SwiGLU
    assert seen == [(0, False)] * 2 if checkpoint else [(2, fastops.wanted())] * 2
    assert any("grad checkpointing" in str(line) for line in lines) == checkpoint
