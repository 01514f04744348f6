"""The embedded demo, its shipped assets and the examples/ folder."""

import json
import random
import sys
from pathlib import Path

from mlx_kto.config.core import KTOConfig, load_yaml, make_config
from mlx_kto.demo import ASSETS, task

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------------------
# examples/


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_example_yaml_loads(path):
    values = load_yaml(path)  # unknown field names raise UserError
    cfg = make_config(path)
    assert cfg.model and cfg.data, f"{path.name} should name a model and data"
    assert values["model"] == cfg.model


def test_examples_exist():
    assert len(list(EXAMPLES.glob("*.yaml"))) >= 5
    assert (EXAMPLES / "build_demo_model.py").exists()


def test_example_data_files_load():
    from mlx_kto.data.rows import load_examples

    chat = load_examples(EXAMPLES / "data" / "chat_feedback.jsonl")
    assert chat[0].conversational and {e.label for e in chat} == {True, False}
    paired = load_examples(EXAMPLES / "data" / "paired_preferences.jsonl")
    assert sum(e.label for e in paired) * 2 == len(paired)


def test_paired_to_unpaired(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    try:
        from paired_to_unpaired import unpair
    finally:
        sys.path.remove(str(EXAMPLES))
    src = EXAMPLES / "data" / "paired_preferences.jsonl"
    n_pairs = len(src.read_text().splitlines())
    rows = unpair(src)
    assert len(rows) == 2 * n_pairs and sum(r["label"] for r in rows) == n_pairs
    # Implicit-prompt pairs: the shared user turn became the prompt.
    primes = [r for r in rows if r["prompt"][0]["content"] == "Is 17 a prime number?"]
    assert len(primes) == 2 and all(r["completion"][0]["role"] == "assistant" for r in primes)
    fewer = unpair(src, keep_rejected=0.0)
    assert len(fewer) == n_pairs and all(r["label"] for r in fewer)


# ---------------------------------------------------------------------------
# the synthetic task and its classifier


def test_classifier_recognises_each_style():
    import random

    rng = random.Random(0)
    for style in task.STYLES:
        for _q, a in task.questions()[:10]:
            assert task.classify(task.render(a, style, rng)) == style
    assert task.classify("Of course! It is blue. Stop bothering me.") == "mixed"
    assert task.classify("  ") == "empty"
    assert task.classify("Happy to It is blue.") == "terse"  # a garbled opener is not polite


def test_heldout_questions_never_in_feedback():
    held = {q for q, _ in task.questions("heldout")}
    fed = {q for q, _ in task.questions("feedback")}
    assert held and fed and not held & fed
    assert held | fed == {q for q, _ in task.questions("all")}


# ---------------------------------------------------------------------------
# shipped assets


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_shipped_assets_are_small_and_consistent():
    model = ASSETS / "model"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    size = (model / "model.safetensors").stat().st_size
    assert size < 5e6, f"demo weights are {size / 1e6:.1f} MB"
    manifest = json.loads((ASSETS / "manifest.json").read_text())
    train = _rows(ASSETS / "data" / "train.jsonl")
    valid = _rows(ASSETS / "data" / "valid.jsonl")
    assert len(train) >= 300
    up = sum(r["label"] == "thumbs_up" for r in train) / len(train)
    assert 0.2 < up < 0.4, f"feedback should be imbalanced like real feedback, got {up:.0%} up"
    # Labels are the classifier's verdict on the completion.
    for r in train + valid:
        assert (r["label"] == "thumbs_up") == task.is_desirable(r["completion"][0]["content"])
    held = set(json.loads((ASSETS / "heldout_prompts.json").read_text()))
    assert held == {q for q, _ in task.questions("heldout")}
    assert not held & {r["prompt"][0]["content"] for r in train}
    assert {r["prompt"][0]["content"] for r in valid} <= held
    # The data part of the build is reproducible from the seed in the manifest.
    seed = manifest["seed"]
    assert train == task.feedback_rows(task.questions("feedback"), len(train), seed + 1)
    assert valid == task.feedback_rows(task.questions("heldout"), len(valid), seed + 2)


# ---------------------------------------------------------------------------
# configuration of the demo


def test_demo_config_defaults_and_overrides(tmp_path):
    from mlx_kto.demo.run import DEMO_DEFAULTS, QUICK, demo_config

    cfg = demo_config()
    assert cfg.model == str(ASSETS / "model") and cfg.data == str(ASSETS / "data")
    assert cfg.iters == DEMO_DEFAULTS["iters"] and cfg.desirable_weight == "auto"
    assert demo_config(quick=True).iters == QUICK["iters"]
    # Fields the user set (e.g. `mlx-kto train --beta 0.2 --iters 7`) win over demo defaults.
    user = KTOConfig(beta=0.2, iters=7, learning_rate=1e-3)
    cfg = demo_config(user, out=str(tmp_path / "o"), seed=5)
    assert (cfg.beta, cfg.iters, cfg.learning_rate, cfg.seed) == (0.2, 7, 1e-3, 5)
    assert cfg.adapter_path == str(tmp_path / "o")
    assert demo_config(steps=9, quick=True).iters == 9


def test_train_without_model_or_data_runs_the_demo(monkeypatch):
    import mlx_kto.demo
    from mlx_kto.cli.app import cli

    seen = {}
    monkeypatch.setattr(mlx_kto.demo, "run_demo", lambda cfg: seen.setdefault("cfg", cfg))
    res = CliRunner().invoke(cli, ["train", "--iters", "7", "--beta", "0.3"])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].iters == 7 and seen["cfg"].beta == 0.3 and seen["cfg"].model is None


def _a_run(folder: Path, model: str) -> dict:
    """A run folder as training leaves it (the files `existing_run_files` looks for)."""
    folder.mkdir(parents=True)
    files = {
        "adapters.safetensors": b"weights",
        "kto_config.json": json.dumps({"model": model}).encode(),
        "metrics.jsonl": b'{"step": 1}\n',
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_demo_and_bare_train_refuse_to_replace_another_run(tmp_path):
    """`demo --out RUN` and `train --adapter-path RUN` (no --model/--data: the demo) replaced
    a run of the user's without a word; they stop before any work, naming the way out."""
    import subprocess

    run = tmp_path / "mine"
    files = _a_run(run, "/models/my-own-model")
    for args in (["demo", "--quick", "--out", str(run)], ["train", "--adapter-path", str(run)]):
        p = subprocess.run(
            [sys.executable, "-m", "mlx_kto.cli", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr
        err = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
        assert f"{run} already holds a run" in err[0] and "--overwrite" in err[0]
        assert "sampling" not in p.stdout  # refused before the demo started its work
        assert {f.name: f.read_bytes() for f in run.iterdir()} == files


def test_demo_replaces_only_its_own_previous_run_or_with_overwrite(tmp_path):
    from mlx_kto.demo.run import check_out_folder, demo_config

    logs = []
    _a_run(tmp_path / "demo_run", str(ASSETS / "model"))  # an earlier `mlx-kto demo`
    cfg = check_out_folder(demo_config(out=str(tmp_path / "demo_run")), logs.append)
    assert cfg.overwrite and logs == [f"replacing the previous demo run in {tmp_path / 'demo_run'}"]
    _a_run(tmp_path / "other", "/models/my-own-model")
    asked = demo_config(KTOConfig(overwrite=True), out=str(tmp_path / "other"))
    assert check_out_folder(asked, logs.append).overwrite and len(logs) == 1
    fresh = demo_config(out=str(tmp_path / "new"))
    assert check_out_folder(fresh, logs.append) == fresh and not fresh.overwrite


def test_demo_command_is_attached():
    from mlx_kto.cli.app import cli

    res = CliRunner().invoke(cli, ["demo", "--help"])
    assert res.exit_code == 0
    for opt in ("--out", "--steps", "--seed", "--quick"):
        assert opt in res.output


# ---------------------------------------------------------------------------
# plotting


def _metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [
        {
            "step": s,
            "loss": 0.5 - 0.01 * s,
            "kl": 0.0,
            "rewards/chosen": 0.01 * s,
            "rewards/rejected": -0.01 * s,
            "rewards/margins": 0.02 * s,
        }
        for s in range(1, 6)
    ]
    recs[-1].update({"eval/loss": 0.4, "eval/rewards/margins": 0.1, "eval/kl": 0.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    from mlx_kto.demo.plot import plot_metrics, series

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    path = _metrics(tmp_path)
    assert plot_metrics(path, tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()
    steps, values = series([json.loads(x) for x in path.read_text().splitlines()], "eval/loss")
    assert steps == [5] and values == [0.4]


def test_plot_written_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib")  # optional dependency (the `plot` extra)
    from mlx_kto.demo.plot import plot_metrics

    out = plot_metrics(_metrics(tmp_path), tmp_path / "p.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------
# the demo itself, shortened


def _polite_vs_rude(path: Path) -> Path:
    """The held-out questions, each answered once politely (thumbs up) and once rudely
    (thumbs down), with fixed openers and closers: rows whose log-probs show the direction
    training moved the style, without sampling."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for prompt, answer in task.questions("heldout"):
            for style in ("polite", "rude"):
                row = {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [
                        {"role": "assistant", "content": task.render(answer, style, rng)}
                    ],
                    "label": style == "polite",
                }
                f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.slow  # 40 training steps and 2 x 40 x 6 sampled replies: ~15-30 s
def test_quick_demo_raises_the_desirable_share(tmp_path):
    """The real thing, shortened: sample, train, sample again. The style moves towards
    polite, measured by log-probs of fixed polite and rude answers to the held-out questions
    (`mlx-kto eval` on the run: rewards against the base). The sampled shares come from a
    40-step trajectory and temperature-1 sampling, which another CPU or BLAS need not follow
    draw for draw: only their consistency and the sign of the change are asserted."""
    from mlx_kto.cli.app import cli
    from mlx_kto.demo.run import run_demo

    lines, logs = [], []
    cfg = KTOConfig(ref_cache=str(tmp_path / "cache"), quiet=True)
    res = run_demo(cfg, out=str(tmp_path / "run"), quick=True, echo=lines.append, log=logs.append)
    # The direction: polite answers gain log-prob against rude ones, by far more than float
    # noise could move (measured: margin 2.9 at beta 0.5, accuracy 0.97).
    heldout = _polite_vs_rude(tmp_path / "polite_vs_rude.jsonl")
    out = CliRunner().invoke(
        cli, ["eval", "--adapter-path", str(tmp_path / "run"), "--data", str(heldout)]
    )
    assert out.exit_code == 0, out.output
    scores = json.loads(out.output[out.output.index("{") :])
    assert scores["rows"] == 2 * len(task.questions("heldout"))
    assert scores["rewards/margins"] > 0.1, scores
    assert res.eval_metrics["rewards/margins"] > 0  # the held-out feedback rows, too
    # The sampled shares: fractions of the same samples, reported as saved. Only the sign of
    # the change is asserted (measured 36% -> 99% polite over 108 samples).
    assert res.after["polite"] > res.before["polite"], (res.before, res.after)
    for side in (res.before, res.after):
        shares = [side[k] for k in (*task.STYLES, "mixed", "empty")]
        assert all(0 <= x <= 1 for x in shares) and sum(shares) == pytest.approx(1.0)
    run = tmp_path / "run"
    assert (run / "adapters.safetensors").exists() and (run / "adapter_config.json").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == res.steps and "rewards/margins" in records[-1]
    saved = json.loads((run / "demo_results.json").read_text())
    assert saved["after"]["polite"] == res.after["polite"]
    assert saved["before"]["polite"] == res.before["polite"]
    text = "\n".join(lines)
    assert "before" in text and "after" in text and "Q: " in text
    assert f"{res.after['polite']:.1%}" in text
    assert ("plot:" in text) and (res.plot_path is None) == ("skipped" in text)
    # The diversity line before/after, and the probes logged it during training.
    assert "distinct-2" in text and "self-BLEU" in text
    for side in (res.before, res.after):
        assert 0 < side["distinct_2"] <= 1 and 0 <= side["self_bleu"] <= 1
    assert saved["after"]["distinct_2"] == res.after["distinct_2"]
    probed = [r["step"] for r in records if "diversity/distinct_2" in r]
    assert probed == [30, res.steps]
    # No collapse warning: the demo's settings change the style, not into one fixed answer
    # (measured: every diversity figure >= 0.8 x the base's; the warning is at 0.5 x).
    # test_judge_probes.py tests the monitor itself on built samples.
    assert not any("mode collapse" in m for m in logs)
    assert not any(r.get("diversity/collapse") for r in records)


def test_demo_yaml_matches_the_demo_settings():
    from mlx_kto.demo.run import DEMO_DEFAULTS

    values = load_yaml(EXAMPLES / "demo-model.yaml")
    for name, value in values.items():
        if name in DEMO_DEFAULTS and name != "adapter_path":
            assert DEMO_DEFAULTS[name] == value, name
    assert (ROOT / values["model"]) == ASSETS / "model"
