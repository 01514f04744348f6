"""Judges (a stub rule, the tiny model as judge model), `mlx-kto compare` end to end, its
report files, `mlx-kto plot` and training.png with diversity probes."""

import json

from mlx_kto.errors import UserError
from mlx_kto.judge.judges import ModelJudge, both_orders, load_rule, score_judge, win_rate

import pytest


def _rows(prompts, good, bad):
    rows = []
    for p in prompts:
        for c, label in ((good, True), (bad, False)):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": p}],
                    "completion": [{"role": "assistant", "content": c}],
                    "label": label,
                }
            )
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    """A data folder and a 4-step adapter trained on it with diversity probes every 2 steps."""
    from mlx_kto.config.core import make_config
    from mlx_kto.judge.probes import training_extras
    from mlx_kto.train.run import train

    root = tmp_path_factory.mktemp("judge_run")
    data = root / "data"
    data.mkdir()
    train_p = ["What color is the sky?", "Please say hello.", "Two plus two?", "Help me."]
    _write(data / "train.jsonl", _rows(train_p, "Sure, I would be happy to help you.", "No."))
    _write(
        data / "valid.jsonl",
        _rows(["What color is the grass?", "Summarize the story."], "Of course!", "Go away."),
    )
    cfg = make_config(
        None,
        model=str(tiny_llama),
        data=str(data),
        adapter_path=str(root / "adapter"),
        iters=4,
        batch_size=2,
        learning_rate=1e-3,
        steps_per_eval=2,
        steps_per_save=0,
        diversity_every=2,
        diversity_prompts=2,
        diversity_samples=2,
        diversity_max_tokens=6,
        quiet=True,
    )
    logs = []
    train(cfg, log=logs.append, extras=training_extras())
    return root, data, root / "adapter", logs


# ---------------------------------------------------------------------------
# rules


def test_score_rule_and_preference_rule(tmp_path, monkeypatch):
    mod = tmp_path / "myrules.py"
    mod.write_text(
        "def longer(prompt, reply):\n    return len(reply)\n\n"
        "def prefer_first(prompt, a, b):\n    return 'a'\n\n"
        "def prefer_polite(prompt, a, b):\n    return ('please' in a) - ('please' in b)\n\n"
        "def bad(prompt):\n    return 1\n\n"
        "def words(prompt, reply):\n    return 'many'\n\n"
        "def crash(prompt, a, b):\n    raise KeyError('x')\n"
    )
    monkeypatch.chdir(tmp_path)
    longer = load_rule("myrules:longer")
    assert longer("q", "long reply", "short") == 1 and longer("q", "a", "bb") == -1
    assert longer("q", "ab", "cd") == 0
    # a rule that always picks the first position flips with the order: a tie
    assert load_rule("myrules:prefer_first")("q", "x", "y") == 0
    polite = load_rule(f"{mod}:prefer_polite")  # a file path works as well
    assert polite("q", "yes please", "no") == 1 and polite("q", "no", "yes please") == -1
    for spec in ("myrules", "myrules:missing", "nosuchmodule:f", "myrules:bad", "x.py:f"):
        with pytest.raises(UserError):
            load_rule(spec)
    with pytest.raises(UserError, match="returned 'many'; expected a number"):
        load_rule("myrules:words")("q", "a", "b")
    with pytest.raises(UserError, match="myrules:crash: raised KeyError"):
        load_rule("myrules:crash")("q", "a", "b")


def test_win_rate_counts():
    judge = score_judge(lambda p, r: len(r))
    res = win_rate(judge, ["p1", "p2"], [["aaa", "a"], ["bb", "b"]], [["a", "aa"], ["bb", "c"]])
    assert (res["wins"], res["losses"], res["ties"]) == (1, 1, 2)
    assert res["win_rate"] == 0.5
    strict = both_orders(lambda p, a, b: 1 if a > b else -1 if a < b else 0)
    assert win_rate(strict, ["p"], [["z"]], [["a"]])["win_rate"] == 1.0


def test_model_judge_both_orders(tiny_llama, tokenizer):
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.model.load import load_base

    model, tok, _, _ = load_base(KTOConfig(model=str(tiny_llama)))
    judge = ModelJudge(model, tok, batch_size=2)
    assert judge.a_ids and judge.b_ids and not set(judge.a_ids) & set(judge.b_ids)
    triples = [
        ("What color is the sky?", "It is blue.", "No."),
        ("Say hello.", "Hello! How are you today?", "Go away."),
        ("Same?", "It is blue.", "It is blue."),
    ]
    one = judge.preferences(triples)
    # batched (right-padded) equals one at a time
    assert one == [judge.preferences([t])[0] for t in triples]
    verdicts = judge.judge_many(triples)
    assert set(verdicts) <= {-1, 0, 1}
    assert verdicts == [-v for v in judge.judge_many([(p, b, a) for p, a, b in triples])]
    assert verdicts[2] == 0  # identical replies: whatever the model says, a tie
    res = win_rate(judge, ["q"], [["It is blue."]], [["It is blue."]])
    assert (res["ties"], res["win_rate"]) == (1, 0.5)


# ---------------------------------------------------------------------------
# training: probes, training.png, mlx-kto plot


def test_training_logs_diversity_and_writes_plot(run):
    root, _, adapter, logs = run
    records = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines()]
    probed = [r["step"] for r in records if "diversity/distinct_2" in r]
    assert probed == [2, 4]
    r = records[-1]
    for k in ("distinct_1", "distinct_2", "self_bleu", "entropy", "length"):
        assert f"diversity/{k}" in r and f"diversity/base/{k}" in r
    assert 0 <= r["diversity/distinct_2"] <= 1 and r["diversity/entropy"] > 0
    assert any(line.startswith("diversity of the base") for line in logs)
    png = adapter / "training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line == f"plot: {png}" for line in logs)


def test_plot_command(run, tmp_path):
    from mlx_kto.cli.app import cli

    from click.testing import CliRunner

    _, _, adapter, _ = run
    out = tmp_path / "p.png"
    res = CliRunner().invoke(cli, ["plot", str(adapter), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and str(out) in res.output
    res = CliRunner().invoke(cli, ["plot", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "no metrics.jsonl" in str(res.exception or res.output)


# ---------------------------------------------------------------------------
# compare


def test_compare_end_to_end_with_rule(run, tiny_llama, tmp_path, capsys):
    from mlx_kto.cli.app import cli
    from mlx_kto.cli.app import run as run_cli

    _, data, adapter, _ = run
    rule = tmp_path / "rule.py"
    rule.write_text("def score(prompt, reply):\n    return -len(reply)\n")
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_llama), "--adapter-path", f"kto={adapter}"]
    args += ["--data", str(data), "--samples", "3", "--max-tokens", "8", "--seed", "1"]
    args += ["--judge", f"{rule}:score", "-o", str(out)]
    run_cli(cli, args)
    printed = capsys.readouterr().out
    assert "self-BLEU" in printed and printed.count("\nkto ") == 1
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["models"]) == ["base", "kto"]
    assert doc["prompt_source"].endswith("valid.jsonl") and len(doc["samples"]) == 2
    base, kto = doc["models"]["base"], doc["models"]["kto"]
    assert base["reward_margin"] == 0.0 and base["win_rate"] is None
    assert kto["labelled_rows"] == 4 and 0 <= kto["reward_accuracy"] <= 1
    assert doc["labelled_rows"] == {"data": str(data), "split": "valid"}
    assert kto["wins"] + kto["losses"] + kto["ties"] == 2 * 3
    # the rule scores shorter replies higher: the counts must follow the replies' lengths
    pairs = [
        (len(s["replies"]["kto"][i]), len(s["replies"]["base"][i]))
        for s in doc["samples"]
        for i in range(3)
    ]
    assert kto["wins"] == sum(c < b for c, b in pairs)
    assert kto["losses"] == sum(c > b for c, b in pairs)
    for m in (base, kto):
        assert 0 <= m["distinct_2"] <= 1 and m["entropy"] > 0 and m["length"] > 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<th>kto</th>" in html
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # the same seed draws the same samples: a second run gives the same JSON figures
    run_cli(cli, args[:-1] + [str(tmp_path / "cmp2")])
    again = json.loads((tmp_path / "cmp2" / "compare.json").read_text())
    assert again["models"] == doc["models"] and again["samples"] == doc["samples"]


def test_compare_prompts_file_and_judge_model(run, tiny_llama, tmp_path):
    from mlx_kto.judge.compare import CompareSettings, parse_adapter_specs, run_compare

    _, _, adapter, _ = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What color is the sky?\n\nPlease say hello.\n")
    settings = CompareSettings(
        model=str(tiny_llama),
        adapters=parse_adapter_specs([str(adapter)]),
        data=str(prompts),
        samples=2,
        max_tokens=6,
        judge_model=str(tiny_llama),
        out=str(tmp_path / "o"),
    )
    lines = []
    doc = run_compare(settings, log=lambda m: None, echo=lines.append)
    m = doc["models"]["adapter"]
    assert m["wins"] + m["losses"] + m["ties"] == 4 and 0 <= m["win_rate"] <= 1
    assert m["reward_accuracy"] is None and doc["labelled_rows"] is None  # no labels
    assert [s["prompt"] for s in doc["samples"]] == ["What color is the sky?", "Please say hello."]
    assert any("win/loss/tie" in x for x in lines)


def test_prompts_file_formats(tmp_path):
    from mlx_kto.judge.sample import load_prompts

    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "Hi"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]}
        )
        + "\n"
        + json.dumps({"prompt": "Hi"})
        + "\n"
    )
    got, _ = load_prompts(p)
    assert [g.prompt for g in got] == ["Hi", [{"role": "user", "content": "Q?"}]]
    assert got[1].text == "Q?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"nothing": 1}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        load_prompts(bad)
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        load_prompts(bad)


def test_compare_user_errors_are_one_line(tiny_llama, tmp_path, capsys):
    from mlx_kto.cli.app import cli
    from mlx_kto.cli.app import run as run_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    cases = [
        (["--adapter-path", str(tmp_path)], "has no adapters.safetensors"),
        (["--judge", "nosuch:f"], "cannot import"),
        (["--judge", "a:b", "--judge-model", str(tiny_llama)], "not both"),
    ]
    for extra, msg in cases:
        with pytest.raises(SystemExit) as e:
            run_cli(cli, ["compare", "--model", str(tiny_llama), "--data", str(prompts), *extra])
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "Traceback" not in err


def test_probes_leave_training_unchanged(run, tiny_llama, tmp_path):
    """Sampling uses its own keys: the same run without probes trains the same weights."""
    from mlx_kto.config.core import make_config
    from mlx_kto.train.run import train

    import mlx.core as mx

    _, data, adapter, _ = run
    cfg = make_config(
        None,
        model=str(tiny_llama),
        data=str(data),
        adapter_path=str(tmp_path / "plain"),
        iters=4,
        batch_size=2,
        learning_rate=1e-3,
        steps_per_eval=2,
        steps_per_save=0,
        quiet=True,
    )
    train(cfg, log=lambda m: None)
    with_probes = mx.load(str(adapter / "adapters.safetensors"))
    without = mx.load(str(tmp_path / "plain" / "adapters.safetensors"))
    assert with_probes.keys() == without.keys()
    for k in without:
        assert mx.array_equal(with_probes[k], without[k]), k


def test_report_files_keep_the_umask(tmp_path):
    import os

    from mlx_kto.judge.files import atomic_write_text

    old = os.umask(0o027)
    try:
        path = atomic_write_text(tmp_path / "r.html", "x")
    finally:
        os.umask(old)
    assert path.read_text() == "x" and (path.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]  # no temp file left


def test_example_judge_rule():
    from pathlib import Path

    rule = Path(__file__).resolve().parent.parent / "examples" / "judge_polite.py"
    judge = load_rule(f"{rule}:score")
    q = "What color is the sky?"
    assert (
        judge(q, "Of course! It is blue. Hope this helps.", "Ugh. It is blue. Stop bothering me.")
        == 1
    )
    assert judge(q, "It is blue.", "It is green.") == 1  # the right answer breaks the tie
    assert judge(q, "It is blue.", "It is blue.") == 0


def test_plot_reads_a_run_in_progress_and_needs_metrics(tmp_path):
    from mlx_kto.judge.plot import plot_metrics, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]  # the line being written: skipped
    assert plot_metrics(path, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    path.write_text('{"step": 1, "tokens": 5}\n')
    with pytest.raises(UserError, match="no metrics to plot"):
        plot_metrics(path, tmp_path / "u.png")
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2"):
        read_metrics(path)


def test_compare_never_replaces_an_earlier_report_unasked(tiny_llama, tmp_path, capsys):
    """Report files of an earlier compare are replaced only with --overwrite; other files in
    the folder are left alone; the refusal comes before any sampling."""
    from mlx_kto.cli.app import cli
    from mlx_kto.cli.app import run as run_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\nWhat color is the sky?\n")
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    args = ["compare", "--model", str(tiny_llama), "--data", str(prompts), "--samples", "2"]
    args += ["--max-tokens", "4", "-o", str(out)]
    run_cli(cli, args)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(first) == {"notes.txt", "compare.json", "report.html", "compare.png"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(cli, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--overwrite" in err and "compare.json" in err
    assert "sampling" not in err  # refused before any work
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    run_cli(cli, [*args, "--overwrite"])
    assert (out / "notes.txt").read_text() == "mine\n"
    again = json.loads((out / "compare.json").read_text())
    assert again["samples"] == json.loads(first["compare.json"])["samples"]  # same seed


def test_plot_replaces_another_file_only_with_overwrite(run, tmp_path, capsys):
    from mlx_kto.cli.app import cli
    from mlx_kto.cli.app import run as run_cli

    _, _, adapter, _ = run
    out = tmp_path / "p.png"
    out.write_bytes(b"my picture")
    with pytest.raises(SystemExit) as e:
        run_cli(cli, ["plot", str(adapter), "-o", str(out)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"my picture"
    run_cli(cli, ["plot", str(adapter), "-o", str(out), "--overwrite"])
    assert out.read_bytes()[:4] == b"\x89PNG"
    run_cli(cli, ["plot", str(adapter)])  # the run's own training.png is redrawn in place
    assert (adapter / "training.png").read_bytes()[:4] == b"\x89PNG"
