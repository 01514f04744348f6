"""A training run never corrupts results or loses work: NaN never reaches the reference, the
cache or the weights; run folders are never mixed; resume continues the same run; every
enumerated option runs; disk-full and torn metrics lines are handled (issue 10)."""

import errno
import json
import os
import shutil

from mlx_kto.config.core import KTOConfig, field_choices
from mlx_kto.errors import UserError
from mlx_kto.train.guard import Diverged
from mlx_kto.train.run import train

import mlx.core as mx
import numpy as np
import pytest
from feedback_fixtures import quick_cfg, write_feedback

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust_data")
    write_feedback(d / "train.jsonl", 32, seed=0)
    return d


def cfg_for(model, data, out, **kw):
    kw.setdefault("iters", 4)
    kw.setdefault("ref_cache", str(out) + "_cache")
    return quick_cfg(model, data, out, **kw)


def adapter(path):
    return {k: np.array(v) for k, v in mx.load(str(path / "adapters.safetensors")).items()}


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- 1. the reference never reads the adapter; the cache never holds a non-finite value --------


def _lora(tiny_llama, **cfg_kw):
    from mlx_kto.model.load import apply_lora, load_base

    cfg = KTOConfig(model=str(tiny_llama), lora_rank=4, **cfg_kw).validate()
    model, tok, _, _ = load_base(cfg)
    base_model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    return model, base_model, tok


def _poison(model):
    from mlx_kto.model.load import lora_modules

    for m in lora_modules(model):
        m.lora_a = mx.full(m.lora_a.shape, float("nan"))
        m.lora_b = mx.full(m.lora_b.shape, float("nan"))


@pytest.mark.parametrize("kind", ["plain", "quantized", "dora"])
def test_reference_ignores_nan_adapter(tiny_llama, kind):
    """NaN LoRA (or DoRA) weights, plain or quantized base: the reference is exactly the base."""
    from mlx_kto.model.load import reference_mode
    from mlx_kto.model.logprobs import sequence_logps

    kw = {"quantize": 8, "q_group_size": 32} if kind == "quantized" else {}
    if kind == "dora":
        from mlx_kto.model.load import load_base

        from mlx_lm.tuner.utils import linear_to_lora_layers

        cfg = KTOConfig(model=str(tiny_llama)).validate()
        model, tok, _, _ = load_base(cfg)
        base_model, _, _, _ = load_base(cfg)
        model.freeze()
        linear_to_lora_layers(model, -1, {"rank": 4, "scale": 2.0, "dropout": 0.0}, use_dora=True)
    else:
        model, base_model, tok = _lora(tiny_llama, **kw)
    _poison(model)
    toks = mx.array([tok.encode("The sky is blue. Hello!")] * 2)
    mask = mx.ones(toks.shape, dtype=mx.bool_)
    want = sequence_logps(base_model, toks, mask)
    assert mx.isnan(sequence_logps(model, toks, mask)).all().item()
    model.train()
    with reference_mode(model):
        got = sequence_logps(model, toks, mask)
    assert mx.array_equal(got, want).item()
    # restored: the LoRA modules are back (still NaN), the training mode too
    assert model.training and mx.isnan(sequence_logps(model, toks, mask)).all().item()


def test_frozen_reference_ignores_trained_values(tiny_llama):
    """With a starting adapter, the reference is base + that adapter, whatever the trained
    weights became."""
    from mlx_kto.model.load import lora_modules, reference_mode, trainable_lora
    from mlx_kto.model.logprobs import sequence_logps

    model, _, tok = _lora(tiny_llama)
    for m in lora_modules(model):
        m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(3)) * 0.1
    frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
    toks = mx.array([tok.encode("The sea is green.")] * 2)
    mask = mx.ones(toks.shape, dtype=mx.bool_)
    model.eval()
    want = sequence_logps(model, toks, mask)
    _poison(model)
    with reference_mode(model, frozen):
        got = sequence_logps(model, toks, mask)
    assert mx.array_equal(got, want).item()


def test_cache_never_stores_or_returns_non_finite(tmp_path):
    from mlx_kto.reference.cache import RefCache, _pack_value, entry_key

    cache = RefCache(tmp_path, log=lambda *_: None)
    fp = "ab" * 32
    fid = cache.register(fp)
    k_nan, k_inf, k_ok = (entry_key(fp, [1, 2, i], 1) for i in range(3))
    cache.put_many(fid, [(k_nan, float("nan"), 2), (k_inf, float("-inf"), 2), (k_ok, -1.5, 2)])
    assert set(cache.get_many([k_nan, k_inf, k_ok])) == {k_ok}
    # An old poisoned entry with a valid checksum (what earlier versions stored): corrupt.
    cache.db.execute(
        "INSERT OR REPLACE INTO entries VALUES (?, ?, ?)",
        (k_nan, fid, _pack_value(k_nan, float("nan"), 2)),
    )
    before = cache.corrupt
    assert cache.get_many([k_nan]) == {}
    assert cache.corrupt == before + 1


def test_diverged_run_leaves_the_cache_clean(tiny_llama, data, tmp_path):
    """After a diverging run (huge learning rate), a normal run on the same cache trains the
    same adapter as on a fresh cache."""
    shared = str(tmp_path / "shared_cache")
    bad = cfg_for(
        tiny_llama,
        data,
        tmp_path / "bad",
        iters=12,
        learning_rate=1e30,
        max_grad_norm=0.0,
        warmup_steps=0,
        max_bad_steps=50,
        ref_cache=shared,
    )
    res = train(bad, **QUIET)  # every update after the first is skipped; never applied
    assert res.steps == 12
    recs = [json.loads(x) for x in (tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped", False) for r in recs) >= 8
    for k, v in adapter(tmp_path / "bad").items():
        assert np.isfinite(v).all(), k
    fresh = train(cfg_for(tiny_llama, data, tmp_path / "fresh", iters=6), **QUIET)
    reused = train(
        cfg_for(tiny_llama, data, tmp_path / "reused", iters=6, ref_cache=shared), **QUIET
    )
    assert reused.reference["ref_hits"] > 0
    assert_same_adapter(adapter(fresh.adapter_path), adapter(reused.adapter_path))


# -- 2. divergence guard ----------------------------------------------------------------------


@pytest.mark.parametrize("streams", ["1", None])
def test_divergence_stops_and_skipped_steps_leave_weights_alone(
    tiny_llama, data, tmp_path, monkeypatch, streams
):
    """Both step paths: the whole-step compiled one (one CPU stream, as on a GPU) and the
    row-parallel eager one."""
    if streams:
        monkeypatch.setenv("MLX_KTO_CPU_STREAMS", streams)
    out = tmp_path / "run"
    cfg = cfg_for(
        tiny_llama,
        data,
        out,
        iters=20,
        learning_rate=1e30,
        max_grad_norm=0.0,
        warmup_steps=0,
        steps_per_save=1,
        keep_checkpoints=2,
        max_bad_steps=3,
    )
    with pytest.raises(Diverged, match=r"diverged at step 4: 3 steps in a row.*--learning-rate"):
        train(cfg, **QUIET)
    assert not (out / "adapters.safetensors").exists() or all(
        np.isfinite(v).all() for v in adapter(out).values()
    )
    c2, c3 = out / "checkpoints" / "step_0000002", out / "checkpoints" / "step_0000003"
    # steps 2 and 3 were skipped: weights and optimizer state (its step count too) unchanged
    assert_same_adapter(adapter(c2), adapter(c3))
    o2, o3 = (mx.load(str(c / "optimizer.safetensors")) for c in (c2, c3))
    for k in o2:
        assert mx.array_equal(o2[k], o3[k]).item(), k
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r.get("skipped")] == [2, 3]


def test_non_finite_checkpoint_is_never_written_nor_prunes(tiny_llama, data, tmp_path):
    from mlx_kto.model.load import save_adapter
    from mlx_kto.train.checkpoint import list_checkpoints, save_checkpoint

    import mlx.optimizers as optim

    model, _, _ = _lora(tiny_llama)
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    state = {"epoch": 0, "batch": 0, "config": {}}
    save_checkpoint(tmp_path, 1, model, opt, state, {}, keep=1)
    _poison(model)
    with pytest.raises(UserError, match="not finite"):
        save_checkpoint(tmp_path, 2, model, opt, state, {}, keep=1)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_0000001"]
    with pytest.raises(UserError, match="non-finite"):
        save_adapter(model, tmp_path / "final", {})
    assert not (tmp_path / "final" / "adapters.safetensors").exists()


# -- 3. run folders ---------------------------------------------------------------------------


def test_existing_run_folder_is_refused_or_overwritten(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_llama, data, out, iters=4, steps_per_save=2, keep_checkpoints=0), **QUIET)
    before = (out / "metrics.jsonl").read_text()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a run.*--resume.*--overwrite"):
        train(cfg_for(tiny_llama, data, out, iters=2), **QUIET)
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    with pytest.raises(UserError, match="missing"):  # a mistyped input costs the old run nothing
        train(cfg_for(tiny_llama, tmp_path / "missing", out, overwrite=True), **QUIET)
    assert (out / "metrics.jsonl").read_text() == before
    train(cfg_for(tiny_llama, data, out, iters=3, steps_per_save=0, overwrite=True), **QUIET)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003"]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "notes.txt").read_text() == "mine"  # not a run file: left alone
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_output_folders_are_one_line(tiny_llama, data, tmp_path, monkeypatch):
    import tempfile

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match=f"{f} exists and is not a folder"):
        train(cfg_for(tiny_llama, data, f), **QUIET)
    with pytest.raises(UserError, match=f"{f}/sub.*is a file"):
        train(cfg_for(tiny_llama, data, f / "sub"), **QUIET)

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(UserError, match=f"{tmp_path / 'ro'}: not writable"):
        train(cfg_for(tiny_llama, data, tmp_path / "ro"), **QUIET)


def _full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["metrics", "checkpoint", "adapter"])
def test_disk_full_is_one_line_naming_the_path(tiny_llama, data, tmp_path, monkeypatch, where):
    import mlx_kto.model.load as model_mod
    import mlx_kto.runtime.atomic as atomic_mod
    import mlx_kto.train.checkpoint as ckpt_mod

    out = tmp_path / "run"
    cfg = cfg_for(tiny_llama, data, out, iters=4, steps_per_save=2)
    if where == "metrics":
        real = atomic_mod.append_line

        class HalfFull:  # the disk fills up halfway through step 3's line
            def __init__(self, f):
                self.f = f

            def fileno(self):
                return self.f.fileno()

            def write(self, s):
                self.f.write(s[: len(s) // 2])
                self.f.flush()
                _full()

        def append(f, path, line):
            return real(HalfFull(f) if json.loads(line)["step"] == 3 else f, path, line)

        monkeypatch.setattr("mlx_kto.train.loop.append_line", append)
        needle = f"{out / 'metrics.jsonl'}: disk full"
    elif where == "checkpoint":
        monkeypatch.setattr(ckpt_mod, "_write_checkpoint", _full)
        needle = f"{out / 'checkpoints' / 'step_0000002'}: disk full"
    else:
        monkeypatch.setattr(model_mod, "atomic_save_safetensors", _full)
        needle = f"{out / 'adapters.safetensors'}: disk full"
    with pytest.raises(UserError) as e:
        train(cfg, **QUIET)
    assert needle in str(e.value) and "\n" not in str(e.value)
    if where == "metrics":  # the torn half line was cut back: every line parses
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2]


def test_short_safetensors_write_is_detected(tmp_path):
    from mlx_kto.runtime.atomic import check_safetensors_size

    p = tmp_path / "a.safetensors"
    mx.save_safetensors(str(p), {"w": mx.zeros((64, 64))})
    check_safetensors_size(p)
    p.write_bytes(p.read_bytes()[:-100])  # what a full disk leaves (MLX reports nothing)
    with pytest.raises(OSError) as e:
        check_safetensors_size(p)
    assert e.value.errno == errno.ENOSPC


# -- 4 / 7. resume ----------------------------------------------------------------------------


def test_torn_metrics_line_then_resume(tiny_llama, data, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(tiny_llama, data, out, iters=4, steps_per_save=2), **QUIET)
    shutil.rmtree(out / "checkpoints" / "step_0000004")
    m = out / "metrics.jsonl"
    lines = m.read_text().splitlines()
    m.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # torn last line
    res = train(cfg_for(tiny_llama, data, out, iters=4, resume=str(out)), **QUIET)
    assert res.steps == 4
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_into_moved_folder_from_another_cwd(tiny_llama, data, tmp_path, monkeypatch):
    """Relative paths at the start; the run folder is moved and resumed from elsewhere: it
    continues in its new place (nothing re-created at the old one)."""
    from mlx_kto.cli.app import build_config

    monkeypatch.chdir(tiny_llama.parent)
    rel = cfg_for(
        os.path.relpath(tiny_llama),
        os.path.relpath(data),
        os.path.relpath(tmp_path / "old"),
        iters=4,
        steps_per_save=2,
    )
    train(rel, **QUIET)
    saved = json.loads((tmp_path / "old" / "kto_config.json").read_text())
    assert os.path.isabs(saved["model"]) and os.path.isabs(saved["data"])
    shutil.rmtree(tmp_path / "old" / "checkpoints" / "step_0000004")
    os.replace(tmp_path / "old", tmp_path / "new")
    monkeypatch.chdir(tmp_path)
    cfg = build_config(None, {"resume": str(tmp_path / "new"), "iters": 4, "quiet": True})
    res = train(cfg, **QUIET)
    assert res.adapter_path == tmp_path / "new" and res.steps == 4
    assert not (tmp_path / "old").exists()
    assert (tmp_path / "new" / "checkpoints" / "step_0000004").exists()


def test_resume_refuses_changed_data_or_setup(tiny_llama, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_feedback(d / "train.jsonl", 32, seed=0)
    out = tmp_path / "run"
    train(cfg_for(tiny_llama, d, out, iters=2), **QUIET)
    with pytest.raises(UserError, match=r"batch_size 4 -> 8.*--resume-changed"):
        train(cfg_for(tiny_llama, d, out, iters=3, resume=str(out), batch_size=8), **QUIET)
    with pytest.raises(UserError, match=r"seed 0 -> 5"):
        train(cfg_for(tiny_llama, d, out, iters=3, resume=str(out), seed=5), **QUIET)
    write_feedback(d / "train.jsonl", 32, seed=9)
    with pytest.raises(UserError, match=r"data \(the content of the training data"):
        train(cfg_for(tiny_llama, d, out, iters=3, resume=str(out)), **QUIET)
    res = train(cfg_for(tiny_llama, d, out, iters=3, resume=str(out), resume_changed=True), **QUIET)
    assert res.steps == 3


@pytest.mark.parametrize(
    "content, needle",
    [("", "is empty"), ("{not json", "not valid JSON"), ('{"step": 2}', "lacks 'epoch'")],
)
def test_bad_trainer_state_is_one_line(tmp_path, content, needle):
    from mlx_kto.cli.app import build_config

    ck = tmp_path / "run" / "checkpoints" / "step_0000002"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(content)
    with pytest.raises(UserError, match=f"{ck / 'trainer_state.json'} .*{needle}"):
        build_config(None, {"resume": str(tmp_path / "run")})


# -- 5. every choice of every enumerated option runs ------------------------------------------


def _choice_cases():
    cases = [(name, value) for name, values in field_choices().items() for value in values]
    cases += [
        (f.name, not f.default)
        for f in __import__("dataclasses").fields(KTOConfig)
        if f.type in (bool, "bool") and f.name not in ("quiet", "overwrite", "resume_changed")
    ]
    return cases


def test_choice_fields_are_known():
    names = set(field_choices())
    assert {"loss_type", "lr_schedule", "dtype", "quantize"} <= names


@pytest.mark.parametrize("name, value", _choice_cases())
def test_every_choice_runs(tiny_llama, data, tmp_path, name, value):
    kw = {name: value, "iters": 2, "warmup_steps": 0, "q_group_size": 32}
    if name == "loss_type" and value in ("dpo", "ipo"):  # paired losses train on pairs
        data = tmp_path / "pairs"
        data.mkdir()
        pairs = [
            {"prompt": f"Question {i}?", "chosen": " Gladly, here it is.", "rejected": " No."}
            for i in range(16)
        ]
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    if name == "dtype" and value in ("float16", "bfloat16"):
        kw.update(iters=1, batch_size=2, max_length=32)  # half-precision matmuls are slow on CPU
    res = train(cfg_for(tiny_llama, data, tmp_path / "run", **kw), **QUIET)
    assert res.steps == kw["iters"]
    assert all(np.isfinite(v).all() for v in adapter(res.adapter_path).values())


# -- 6. SIGINT / SIGTERM on a real process ----------------------------------------------------

SIGNAL_ITERS = 40


def _signal_args(model, data, out):
    return [
        "--model", str(model), "--data", str(data), "--adapter-path", str(out),
        "--iters", str(SIGNAL_ITERS), "--batch-size", "4", "--learning-rate", "2e-3",
        "--lora-rank", "4", "--lora-alpha", "8", "--steps-per-eval", "0",
        "--steps-per-save", "100", "--max-length", "64", "--quiet", "--seed", "0",
        "--warmup-steps", "3", "--steps-per-report", "1",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def straight_run(tiny_llama, data, tmp_path_factory):
    """The uninterrupted run, through the same command line."""
    from mlx_kto.cli.app import build_config, train_command

    out = tmp_path_factory.mktemp("straight") / "run"
    ctx = train_command.make_context("train", _signal_args(tiny_llama, data, out))
    flags = dict(ctx.params)
    cfg = build_config(flags.pop("config_file"), flags)
    return adapter(train(cfg, **QUIET).adapter_path)


@pytest.mark.parametrize(
    "signals, code", [(["SIGINT"], 130), (["SIGTERM"], 143), (["SIGINT", "SIGINT"], 130)]
)
@pytest.mark.slow  # 40-step CLI trainings stopped by signals, then resumed
def test_signal_checkpoints_and_resume_matches(
    tiny_llama, data, tmp_path, straight_run, signals, code
):
    """Ctrl-C / SIGTERM mid-run (a second Ctrl-C abandons the step in flight): exit 130 / 143,
    a checkpoint of the last completed step, the resume command printed; --resume then
    reaches exactly the uninterrupted run's adapter."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    p = subprocess.Popen(
        [sys.executable, "-m", "mlx_kto.train", *_signal_args(tiny_llama, data, out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith("step 3/"):
            for name in signals:
                p.send_signal(getattr(signal, name))
            break
    _, rest = p.communicate(timeout=120)
    err = "".join(lines) + rest
    assert p.returncode == code, err
    assert "Traceback" not in err and "Aborted" not in err
    last = err.strip().splitlines()[-1]
    assert f"python -m mlx_kto.train --resume {out}" in last, last
    ckpts = sorted((out / "checkpoints").iterdir())
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].name.split("_")[1]) < SIGNAL_ITERS, ckpts
    done = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert done[-1] >= int(ckpts[0].name.split("_")[1])
    if signals == ["SIGINT"]:  # the printed command, as a user would run it
        r = subprocess.run(
            [sys.executable, "-m", "mlx_kto.train", "--resume", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    else:
        from mlx_kto.cli.app import build_config

        train(build_config(None, {"resume": str(out)}), **QUIET)
    assert_same_adapter(adapter(out), straight_run)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, SIGNAL_ITERS + 1))


def test_cli_refusals_are_one_line_exit_2(tiny_llama, data, tmp_path):
    """Through the real command: an existing run, a corrupt checkpoint state, a diverging run."""
    import subprocess
    import sys

    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_0000002" / "trainer_state.json").write_text("")
    base = ["--model", str(tiny_llama), "--data", str(data), "--max-length", "64", "--quiet"]
    cases = [
        ([*base, "--adapter-path", str(run)], f"{run} already holds a run"),
        (["--resume", str(run)], f"{run}/checkpoints/step_0000002/trainer_state.json is empty"),
        (
            [
                *base,
                "--adapter-path",
                str(tmp_path / "d"),
                "--learning-rate",
                "1e30",
                "--max-grad-norm",
                "0",
                "--warmup-steps",
                "0",
                "--iters",
                "10",
            ],
            "training diverged at step 4",
        ),  # fmt: skip
    ]
    for args, needle in cases:
        p = subprocess.run(
            [sys.executable, "-m", "mlx_kto.train", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 2, p.stderr
        err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and needle in err[0], p.stderr
        assert "Traceback" not in p.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_nan_starting_adapter_is_refused(tiny_llama, data, tmp_path):
    """A starting adapter is the reference: a NaN one is refused, never trained against."""
    from mlx_kto.model.load import adapter_config, trainable_lora

    model, _, _ = _lora(tiny_llama)
    _poison(model)
    bad = tmp_path / "nan_adapter"
    bad.mkdir()
    mx.save_safetensors(str(bad / "adapters.safetensors"), trainable_lora(model))
    lcfg = KTOConfig(model=str(tiny_llama), lora_rank=4).validate()
    (bad / "adapter_config.json").write_text(json.dumps(adapter_config(lcfg, str(tiny_llama), 2)))
    with pytest.raises(UserError, match=f"init_adapter: {bad} holds non-finite"):
        train(cfg_for(tiny_llama, data, tmp_path / "run", init_adapter=str(bad)), **QUIET)


def test_cli_run_whose_every_step_was_skipped_fails_without_an_adapter(tiny_llama, data, tmp_path):
    """Fewer steps than --max-bad-steps, all non-finite (a desirable weight beyond float32):
    before, it exited 0 saying "adapter saved" with the untrained adapter."""
    import subprocess
    import sys

    run = tmp_path / "run"
    args = ["--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(run)]
    args += ["--max-length", "64", "--quiet", "--iters", "2", "--desirable-weight", "1e39"]
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "train", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "every step of this run (steps 1-2)" in err[0] and "no adapter was saved" in err[0]
    assert "adapter saved" not in p.stderr
    assert not (run / "adapters.safetensors").exists() and not (run / "checkpoints").exists()


def _mlx_disk_full(monkeypatch, when):
    """mx.save_safetensors as MLX behaves on a full disk: part of the file, then RuntimeError."""
    real = mx.save_safetensors

    def save(path, arrays, *a, **k):
        real(path, arrays, *a, **k)
        if when(str(path)):
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 3)
            raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", save)


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_mlx_writer_on_a_full_disk_is_one_line_and_leaves_no_half_file(
    tiny_llama, data, tmp_path, monkeypatch, where
):
    out = tmp_path / "run"
    cfg = cfg_for(tiny_llama, data, out, iters=4, steps_per_save=2)
    if where == "checkpoint":  # the step-2 checkpoint
        _mlx_disk_full(monkeypatch, lambda p: "checkpoints" in p)
        needle = f"{out / 'checkpoints' / 'step_0000002'}: disk full"
    else:  # the adapter saved after the last step (its checkpoints were written)
        _mlx_disk_full(monkeypatch, lambda p: os.path.basename(p).startswith(".adapters."))
        cfg = cfg_for(tiny_llama, data, out, iters=4, steps_per_save=0)
        needle = f"{out / 'adapters.safetensors'}: cannot write"
    with pytest.raises(UserError) as e:
        train(cfg, **QUIET)
    msg = str(e.value)
    assert needle in msg and "Unable to write" in msg and "\n" not in msg
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    assert not (out / "adapters.safetensors").exists()
    if where == "checkpoint":
        assert not (out / "checkpoints").exists() or list((out / "checkpoints").iterdir()) == []
    else:
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000004"]


@pytest.mark.parametrize("inside", ["run", "checkpoint"])
def test_cli_overwrite_never_deletes_its_own_starting_adapter(tiny_llama, data, tmp_path, inside):
    """`train --init-adapter X --adapter-path X --overwrite` deleted X, then failed on the
    adapter it had just deleted: refused before anything is touched."""
    import subprocess
    import sys

    run = tmp_path / "run"
    train(cfg_for(tiny_llama, data, run, iters=2, steps_per_save=1), **QUIET)
    init = run if inside == "run" else run / "checkpoints" / "step_0000001"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["--model", str(tiny_llama), "--data", str(data), "--max-length", "64", "--quiet"]
    args += ["--init-adapter", str(init), "--adapter-path", str(run), "--overwrite"]
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "train", *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"would delete the starting adapter {init}" in err[0] and "--adapter-path" in err[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
