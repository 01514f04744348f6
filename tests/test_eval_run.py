"""`mlx-kto eval` evaluates the way the run trained: same numbers as the final eval."""

import json

from mlx_kto.cli.app import cli
from mlx_kto.config.core import make_config
from mlx_kto.train.run import train

import pytest
from click.testing import CliRunner
from feedback_fixtures import write_feedback


@pytest.fixture(scope="module")
def run(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("evaldata")
    write_feedback(d / "train.jsonl", 24, seed=0)
    write_feedback(d / "validation.jsonl", 8, seed=1)  # the 'validation' spelling
    lines = (d / "train.jsonl").read_text().splitlines()
    (d / "test.jsonl").write_text("\n".join(lines[:6]) + "\n")
    # Unbalanced train data, so 'auto' resolves to a weight far from 1.
    extra = [json.loads(x) for x in lines if json.loads(x)["label"] is False][:6]
    with open(d / "train.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in extra)
    out = tmp_path_factory.mktemp("evalrun") / "run"
    cfg = make_config(
        None, model=str(tiny_llama), data=str(d), adapter_path=str(out), batch_size=3,
        iters=8, learning_rate=2e-3, lora_rank=4, beta=0.3, desirable_weight="auto",
        undesirable_weight=0.7, max_length=24, steps_per_eval=0, quiet=True, seed=5,
        warmup_steps=0, pad_multiple=8,
    )  # fmt: skip
    return d, out, train(cfg, log=lambda *_: None)


def _eval(*args):
    res = CliRunner().invoke(cli, ["eval", *args])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout[res.stdout.index("{") :])


def test_run_config_stores_resolved_auto_weight(run):
    _, out, _ = run
    saved = json.loads((out / "kto_config.json").read_text())
    assert isinstance(saved["desirable_weight"], float) and saved["desirable_weight"] > 1.0
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["kto"]["desirable_weight"] == saved["desirable_weight"]


def test_eval_equals_the_trainers_final_eval(run):
    _, out, result = run
    got = _eval("--adapter-path", str(out))
    assert got["rows"] == 8 and got["split"] == "valid"
    for k, v in result.eval_metrics.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    # A flag overrides the run's setting (and so changes the numbers).
    other = _eval("--adapter-path", str(out), "--beta", "0.05")
    assert other["rewards/margins"] != pytest.approx(got["rewards/margins"])


def test_eval_splits(run):
    _, out, _ = run
    assert _eval("--adapter-path", str(out), "--split", "test")["rows"] == 6
    assert _eval("--adapter-path", str(out), "--split", "validation")["rows"] == 8
    assert _eval("--adapter-path", str(out), "--split", "train")["split"] == "train"


def test_eval_split_missing_is_one_line(run, tmp_path):
    d, out, _ = run
    f = tmp_path / "one.jsonl"
    f.write_text((d / "test.jsonl").read_text())
    res = CliRunner().invoke(cli, ["eval", "--adapter-path", str(out), "--data", str(f),
                                   "--split", "test"])  # fmt: skip
    assert res.exit_code != 0 and "--split" in str(res.exception or res.output)


def test_eval_of_a_run_started_from_an_adapter(run, tiny_llama, tmp_path):
    # The reference of such a run is its starting adapter; eval must use it too (against
    # the base model, every reward would differ from the trainer's).
    d, first, _ = run
    out = tmp_path / "second"
    cfg = make_config(
        None, model=str(tiny_llama), data=str(d), adapter_path=str(out), init_adapter=str(first),
        batch_size=3, iters=4, learning_rate=2e-3, beta=0.3, max_length=24, steps_per_eval=0,
        quiet=True, seed=5, warmup_steps=0,
    )  # fmt: skip
    result = train(cfg, log=lambda *_: None)
    got = _eval("--adapter-path", str(out))
    for k, v in result.eval_metrics.items():
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_eval_when_the_runs_data_moved(run, tmp_path, monkeypatch, capsys):
    import shutil

    from mlx_kto.cli.app import run as run_cli

    _, out, _ = run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    conf = json.loads((moved / "kto_config.json").read_text())
    conf["data"] = "relative/elsewhere"
    (moved / "kto_config.json").write_text(json.dumps(conf))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_cli(cli, ["eval", "--adapter-path", str(moved)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--data" in err and "relative/elsewhere" in err, err
