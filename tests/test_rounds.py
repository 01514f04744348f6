"""`mlx-kto rounds`: bad input through the command (one line, exit 2, naming the file and the
prompt), the Python API with a function as the judge (and its resume: nothing on disk is
labelled again), the stop rules, the prompt split, and the judge-model labeller."""

import json
import subprocess
import sys
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.judge.sample import Prompt
from mlx_kto.rounds import record, rounds_config, run_rounds
from mlx_kto.rounds.config import check_resumable, settings_doc
from mlx_kto.rounds.label import RubricJudge, load_rule_file
from mlx_kto.rounds.prompts import split

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "mlx_kto" / "demo" / "assets" / "model"
QUESTIONS = (REPO / "examples" / "rounds" / "demo_prompts.txt").read_text().splitlines()
RULES = """
def ok(prompt, reply):
    return "!" in reply
def boom(prompt, reply):
    raise ValueError("no idea")
def number(prompt, reply):
    return 1
def always(prompt, reply):
    return True
not_a_function = 3
"""
TINY = ["--dtype", "float32", "--max-tokens", "8", "--samples-per-prompt", "2",
        "--iters", "2", "--batch-size", "4", "--max-length", "64", "--quiet"]  # fmt: skip


def mlx_kto(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *map(str, args)], capture_output=True, text=True,
        timeout=300, cwd=cwd,
    )  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    return last


@pytest.fixture
def files(tmp_path):
    (tmp_path / "rules.py").write_text(RULES)
    (tmp_path / "p.txt").write_text("\n".join(QUESTIONS[:4]) + "\n")
    (tmp_path / "h.txt").write_text(QUESTIONS[10] + "\n")
    return tmp_path


def base_args(d: Path, rule: str, out: str = "out", prompts: str = "p.txt") -> list:
    return ["rounds", "--model", MODEL, "--prompts", d / prompts, "--heldout", d / "h.txt",
            "--judge", f"{d / 'rules.py'}:{rule}", "--adapter-path", d / out, *TINY]  # fmt: skip


def test_judge_file_and_function_mistakes_are_one_line(files):
    args = base_args(files, "ok")
    args[args.index("--judge") + 1] = "nope.py:ok"
    assert one_line_error(mlx_kto(*args)) == "error: --judge: nope.py: no such file"
    line = one_line_error(mlx_kto(*base_args(files, "nothere")))
    assert line == f"error: --judge: {files / 'rules.py'} has no function 'nothere'"
    line = one_line_error(mlx_kto(*base_args(files, "not_a_function")))
    assert line == f"error: --judge: {files / 'rules.py'}: 'not_a_function' is not a function"
    assert not (files / "out").exists()  # refused before anything started


def test_judge_that_raises_or_returns_a_non_bool_names_the_rule_and_prompt(files):
    line = one_line_error(mlx_kto(*base_args(files, "boom")))
    assert f"judge {files / 'rules.py'}:boom: raised ValueError: no idea (prompt " in line
    assert QUESTIONS[10][:30] in line  # the held-out prompt being labelled (round 0)
    line = one_line_error(mlx_kto(*base_args(files, "number", out="out2")))
    assert f"{files / 'rules.py'}:number: returned 1 (int) for prompt " in line
    assert "must return True (desirable) or False" in line


def test_empty_prompts_are_one_line_naming_the_file_and_line(files):
    (files / "empty.txt").write_text("\n  \n")
    line = one_line_error(mlx_kto(*base_args(files, "ok", prompts="empty.txt")))
    assert line == f"error: {files / 'empty.txt'}: no prompts in this file"
    (files / "p.jsonl").write_text('{"prompt": "What is two?"}\n{"prompt": ""}\n')
    line = one_line_error(mlx_kto(*base_args(files, "ok", prompts="p.jsonl")))
    assert line.startswith(f"error: {files / 'p.jsonl'}:2: no usable 'prompt'")


def test_one_class_round_then_existing_folder_and_changed_resume(files):
    """A rule that likes everything: round 1's labels are all one class (said, with what to
    change; the file is kept to look at). The folder then holds a run: refused without
    --resume; --resume with another setting is refused, naming it; a plain --resume reads
    the labels from disk (no sampling) and says the same."""
    line = one_line_error(mlx_kto(*base_args(files, "always")))
    fb = files / "out" / "round-1" / "feedback.jsonl"
    assert line.startswith(f"error: {fb}: all 8 replies were labelled desirable by ")
    assert "KTO needs both classes: use a stricter rule" in line
    assert len(fb.read_text().splitlines()) == 8
    line = one_line_error(mlx_kto(*base_args(files, "always")))
    assert "already holds a rounds run" in line and "--resume" in line
    line = one_line_error(mlx_kto("rounds", "--resume", files / "out", "--beta", "0.3"))
    assert "resume: --beta is 0.3, the run in" in line and "has 0.1" in line
    r = mlx_kto("rounds", "--resume", files / "out")
    assert one_line_error(r).startswith(f"error: {fb}: all 8 replies")
    assert "sampling" not in r.stderr


def test_judge_kind_and_loss_mistakes(files):
    line = one_line_error(mlx_kto(*base_args(files, "ok"), "--judge-model", MODEL))
    assert "give one of --judge or --judge-model" in line
    args = [a for a in base_args(files, "ok") if "rules.py" not in str(a) and a != "--judge"]
    assert "--rubric" in one_line_error(mlx_kto(*args, "--judge-model", MODEL))
    assert "unpaired" in one_line_error(mlx_kto(*base_args(files, "ok"), "--loss-type", "dpo"))


def test_help_says_the_rule_is_your_own_code():
    r = mlx_kto("rounds", "--help")
    assert r.returncode == 0 and "runs your own Python code" in " ".join(r.stdout.split())


@pytest.mark.slow
def test_python_api_with_a_function_judge_and_resume_labels_nothing_twice(tmp_path):
    calls = []

    def polite(prompt: str, reply: str) -> bool:
        calls.append((prompt, reply))
        return "!" in reply

    cfg = rounds_config(
        prompts=QUESTIONS[:6], heldout=[QUESTIONS[20], QUESTIONS[30]], out=str(tmp_path / "o"),
        rounds=1, samples_per_prompt=3, max_tokens=12, min_gain=-100,
        train=dict(model=str(MODEL), dtype="float32", iters=2, batch_size=4, max_length=64,
                   quiet=True),
    )  # fmt: skip
    out = []
    recs = run_rounds(cfg, judge=polite, log=lambda m: None, echo=out.append)
    assert [r["round"] for r in recs] == [0, 1]
    n_first = len(calls)
    assert 0 < n_first <= 2 * 3 * 2 + 6 * 3  # held-out twice, training replies once
    assert recs[1]["rows"] == len((tmp_path / "o/round-1/feedback.jsonl").read_text().splitlines())
    for key in ("round", "heldout_share", "rows", "desirable", "distinct_2", "self_bleu",
                "adapter"):  # fmt: skip
        assert key in recs[1]
    row = json.loads((tmp_path / "o/round-1/feedback.jsonl").read_text().splitlines()[0])
    assert row["meta"]["round"] == 1 and row["meta"]["sampling"]["n"] == 3
    assert row["meta"]["judge"] == {"rule": f"{__name__}.{polite.__qualname__}"}
    assert any(line.startswith("best: round") for line in out)
    with pytest.raises(UserError, match="already holds a rounds run"):
        run_rounds(cfg, judge=polite, log=lambda m: None, echo=lambda m: None)
    again = run_rounds(cfg, judge=polite, resume=True, log=lambda m: None, echo=lambda m: None)
    assert len(calls) == n_first and again == recs  # all on disk: nothing labelled again
    line = one_line_error(mlx_kto("rounds", "--resume", tmp_path / "o"))
    assert "labelled by a Python function" in line and "polite" in line


# -- the parts, in process ------------------------------------------------------------------


def _rec(r, share, collapse=()):
    return {"round": r, "heldout_share": share, "collapse": list(collapse)}


def test_stop_rules_and_best_round():
    recs = [_rec(0, 0.3), _rec(1, 0.6)]
    assert record.stop_reason(recs, 0.0, 3) is None
    assert "stopped rising" in record.stop_reason([*recs, _rec(2, 0.6)], 0.0, 3)
    assert "stopped rising" in record.stop_reason([*recs, _rec(2, 0.62)], 5.0, 3)
    assert record.stop_reason([*recs, _rec(2, 0.62)], -100, 3) is None
    fell = record.stop_reason([*recs, _rec(2, 0.9, ["distinct-2 0.1 < 0.5 x base 0.3"])], 0, 3)
    assert fell.startswith("diversity collapsed in round 2 (distinct-2")
    assert "nothing left to raise" in record.stop_reason([*recs, _rec(2, 1.0)], 0, 3)
    assert record.best_round([*recs, _rec(2, 0.9, ["x"])])["round"] == 1
    assert record.best_round([_rec(0, 0.5), _rec(1, 0.5)])["round"] == 0


def test_prompt_split_is_seeded_disjoint_and_keeps_heldout_out_of_training(tmp_path):
    cfg = rounds_config(prompts=QUESTIONS[:20], train=dict(model="m", seed=3))
    train, held = split(cfg, log=lambda m: None)
    assert (train, held) == split(cfg, log=lambda m: None)
    assert len(held) == 4 and not {p.text for p in train} & {p.text for p in held}
    assert sorted(p.text for p in train + held) == sorted(QUESTIONS[:20])
    seen = []
    cfg = rounds_config(prompts=QUESTIONS[:5], heldout=QUESTIONS[3:8], train=dict(model="m"))
    train, held = split(cfg, log=seen.append)
    assert [p.text for p in train] == QUESTIONS[:3] and "2 of the training prompts" in seen[0]
    cfg = rounds_config(prompts=QUESTIONS[:2], heldout=QUESTIONS[:2], train=dict(model="m"))
    with pytest.raises(UserError, match="every prompt is also in --heldout"):
        split(cfg)


def test_rule_accepts_only_bools_and_resume_check_names_the_setting(tmp_path):
    (tmp_path / "r.py").write_text("import numpy as np\ndef f(p, r):\n    return np.bool_(1)\n"
                                   "def g(p, r):\n    return None\n")  # fmt: skip
    assert load_rule_file(f"{tmp_path / 'r.py'}:f").label([Prompt("q")], [["a", "b"]]) == [
        [True, True]
    ]
    with pytest.raises(UserError, match=r"returned None \(NoneType\) for prompt 'q'"):
        load_rule_file(f"{tmp_path / 'r.py'}:g")("q", "a")
    with pytest.raises(UserError, match="not FILE.py:FUNCTION"):
        load_rule_file("r.py")
    with pytest.raises(UserError, match="not a .py file"):
        load_rule_file("mlx_kto.demo.task:classify")  # never a module from sys.path
    cfg = rounds_config(prompts="p.txt", train=dict(model="m"))
    stored = settings_doc(cfg)
    check_resumable(stored, cfg)
    cfg.rounds, cfg.min_gain = 5, 3.0  # may change on a resume
    check_resumable(stored, cfg)
    cfg.train.learning_rate = 1e-3
    with pytest.raises(UserError, match="--learning-rate is 0.001, the run in"):
        check_resumable(stored, cfg)


def test_judge_model_labels_by_the_first_token_yes_or_no():
    """The rubric judge's label is P(Yes) > P(No) at the first answer token, in batches."""
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.model.load import load_base

    import mlx.core as mx

    model, tok, _, _ = load_base(KTOConfig(model=str(MODEL), dtype="float32"), log=print)
    judge = RubricJudge(model, tok, "Is the reply polite?", "demo", batch_size=3)
    prompts = [Prompt(q) for q in QUESTIONS[:2]]
    replies = [["Of course! It is blue.", "Ugh. It is blue.", ""], ["Sure."]]
    labels = judge.label(prompts, replies)
    assert [len(x) for x in labels] == [3, 1] and all(
        isinstance(v, bool) for x in labels for v in x
    )
    for p, rs, ls in zip(prompts, replies, labels):
        for reply, got in zip(rs, ls):
            logits = model(mx.array([judge.query_ids(p.text, reply)]))[0, -1].astype(mx.float32)
            yes = mx.logsumexp(logits[mx.array(judge.a_ids)]).item()
            no = mx.logsumexp(logits[mx.array(judge.b_ids)]).item()
            if abs(yes - no) > 1e-4:  # a near-tie may fall either way in a padded batch
                assert got == (yes > no)
    assert judge.describe() == {"model": "demo", "rubric": "Is the reply polite?"}
