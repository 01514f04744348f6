"""The feedback file: durable concurrent appends, torn last lines, retractions,
per-message labels and column mapping, all read back through the training loader."""

import json
import logging
import subprocess
import sys
import textwrap

from mlx_kto.data.columns import FieldMap
from mlx_kto.data.feedback import append_row, rating_row, read_ratings, retraction_row
from mlx_kto.data.rows import load_examples
from mlx_kto.errors import UserError

import pytest

PROMPT = [{"role": "user", "content": "What color is the sea?"}]


def test_rating_rows_train_as_is(tmp_path):
    f = tmp_path / "fb.jsonl"
    append_row(f, rating_row(PROMPT, "It is blue.", True, {"model": "m", "sampling": {"temp": 1}}))
    append_row(f, rating_row(PROMPT, "Ugh.", False))
    ex = load_examples(f)
    assert [e.label for e in ex] == [True, False]
    assert ex[0].prompt == PROMPT
    assert ex[0].completion == [{"role": "assistant", "content": "It is blue."}]


def test_two_processes_append_without_interleaving(tmp_path):
    """Lines of 200 kB (far above PIPE_BUF) from two processes at once: every line
    stays whole and every row arrives."""
    f = tmp_path / "fb.jsonl"
    script = textwrap.dedent(
        f"""
        import sys
        from mlx_kto.data.feedback import append_row, rating_row
        tag = sys.argv[1]
        for i in range(40):
            append_row({str(f)!r}, rating_row([{{"role": "user", "content": tag}}],
                       tag * 200_000 + str(i), i % 2 == 0))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, t]) for t in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = f.read_bytes().split(b"\n")
    assert lines[-1] == b""
    rows = [json.loads(line) for line in lines[:-1]]  # raises on any torn/interleaved line
    assert sorted(r["prompt"][0]["content"] for r in rows) == ["a"] * 40 + ["b"] * 40
    for r in rows:
        text = r["completion"][0]["content"]
        assert set(text.rstrip("0123456789")) == {r["prompt"][0]["content"]}
    assert len(load_examples(f)) == 80


def test_torn_last_line_is_skipped_with_a_warning_and_repaired_on_append(tmp_path, caplog):
    f = tmp_path / "fb.jsonl"
    append_row(f, rating_row(PROMPT, "It is blue.", True))
    append_row(f, rating_row(PROMPT, "Ugh.", False))
    whole = f.read_bytes()
    f.write_bytes(whole + whole.splitlines(keepends=True)[0][:37])  # a write cut off
    with caplog.at_level(logging.WARNING, logger="mlx_kto"):
        ex = load_examples(f)
    assert len(ex) == 2
    assert "torn last line" in caplog.text and "fb.jsonl:3" in caplog.text
    # The next append drops the torn fragment instead of gluing onto it.
    append_row(f, rating_row(PROMPT, "Of course! It is blue.", True))
    assert len(load_examples(f)) == 3
    assert f.read_bytes().startswith(whole)


def test_torn_line_in_the_middle_is_still_an_error(tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_text(
        '{"prompt": "a", "completion": "b", "lab\n{"prompt": "a", "completion": "b", "label": 1}\n'
    )
    with pytest.raises(UserError, match=r"fb.jsonl:1: invalid JSON"):
        load_examples(f)


def test_complete_last_line_without_newline_is_kept_by_the_writer(tmp_path):
    f = tmp_path / "fb.jsonl"
    f.write_text(json.dumps(rating_row(PROMPT, "It is blue.", True)))  # no final newline
    append_row(f, rating_row(PROMPT, "Ugh.", False))
    assert [e.label for e in load_examples(f)] == [True, False]


def test_retraction_removes_the_rating(tmp_path, caplog):
    f = tmp_path / "fb.jsonl"
    keep, undo = rating_row(PROMPT, "It is blue.", True), rating_row(PROMPT, "Ugh.", True)
    for row in (keep, undo, retraction_row(undo["id"])):
        append_row(f, row)
    ex = load_examples(f)
    assert [e.completion[0]["content"] for e in ex] == ["It is blue."]
    assert [r["id"] for r in read_ratings(f)] == [keep["id"]]
    append_row(f, retraction_row("no-such-id"))
    with caplog.at_level(logging.WARNING, logger="mlx_kto"):
        assert len(load_examples(f)) == 1
    assert "matches no rating" in caplog.text


def test_per_message_labels(tmp_path):
    f = tmp_path / "chat.jsonl"
    msgs = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Go away.", "label": "thumbs_down"},
        {"role": "user", "content": "Please?"},
        {"role": "assistant", "content": "Happy to help!", "label": True},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Bye."},
    ]
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    ex = load_examples(f)
    assert [e.label for e in ex] == [False, True]
    assert ex[0].prompt == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ]
    assert ex[0].completion == [{"role": "assistant", "content": "Go away."}]
    assert [m["content"] for m in ex[1].prompt] == ["Be kind.", "Hi", "Go away.", "Please?"]
    assert all("label" not in m for m in ex[1].prompt)
    assert ex[1].completion == [{"role": "assistant", "content": "Happy to help!"}]


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {"messages": [{"role": "user", "content": "Hi", "label": 1}]},
            r"\[0\]: a label is on a 'user'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "label": 1},
                ],
                "label": 1,
            },
            "top-level 'label' and labels on messages",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "x", "label": "meh"},
                ]
            },
            r"'messages'\[1\]: label 'meh'",
        ),
    ],
)
def test_per_message_label_errors(tmp_path, row, match):
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        load_examples(f)


def test_column_mapping_and_threshold(tmp_path):
    f = tmp_path / "log.jsonl"
    rows = [
        {"question": "Q1", "answer": "A1", "stars": 5},
        {"question": "Q2", "answer": "A2", "stars": 2},
        {"question": "Q3", "answer": "A3", "stars": "4"},
        {"question": "Q4", "answer": "A4", "stars": 1},  # 1 star is bad, not "true"
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fm = FieldMap(label="stars", prompt="question", completion="answer", label_threshold=4)
    ex = load_examples(f, fields=fm)
    assert [(e.prompt, e.completion, e.label) for e in ex] == [
        ("Q1", "A1", True),
        ("Q2", "A2", False),
        ("Q3", "A3", True),
        ("Q4", "A4", False),
    ]
    with pytest.raises(
        UserError, match=r"log.jsonl:1: label 5 is not a thumbs-up/down value .*--label-threshold"
    ):
        load_examples(f, fields=FieldMap(label="stars", prompt="question", completion="answer"))


def test_column_mapping_nested_and_messages(tmp_path):
    f = tmp_path / "log.jsonl"
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    f.write_text(json.dumps({"conversation": conv, "feedback": {"score": 0.9}}) + "\n")
    fm = FieldMap(label="feedback.score", messages="conversation", label_threshold=0.5)
    (e,) = load_examples(f, fields=fm)
    assert e.label is True and e.completion == [conv[1]]


@pytest.mark.parametrize(
    "row, fm, match",
    [
        (
            {"prompt": "a", "completion": "b", "rating": 1},
            FieldMap(label="score"),
            r":1: row has no 'score' \(given as --label-field\)",
        ),
        (
            {"prompt": "a", "completion": "b", "rating": 1, "label": 0},
            FieldMap(label="rating"),
            "both 'rating' .* and 'label'; it is ambiguous",
        ),
        (
            {"prompt": "a", "completion": "b", "rating": "sort of"},
            FieldMap(label="rating", label_threshold=3),
            "label 'sort of' is not a thumbs",
        ),
        (
            {"prompt": "a", "completion": "b", "rating": float("nan")},
            FieldMap(label="rating", label_threshold=3),
            "label is NaN",
        ),
    ],
)
def test_column_mapping_errors(tmp_path, row, fm, match):
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match=match):
        load_examples(f, fields=fm)


def test_mapping_flags_reach_training_config(tmp_path):
    from mlx_kto.config.core import make_config

    y = tmp_path / "c.yaml"
    y.write_text("label_field: stars\nlabel_threshold: 4\nprompt_field: q\n")
    cfg = make_config(y, completion_field="a")
    assert FieldMap.from_config(cfg) == FieldMap(
        label="stars", prompt="q", completion="a", label_threshold=4.0
    )
    assert FieldMap.from_config(make_config(None)) is None


def test_acknowledged_rows_survive_kill_9(tmp_path):
    """A writer prints "ack N" only after append_row returns; SIGKILL it mid-stream:
    every acknowledged row is in the file, and the file still loads."""
    import signal

    f = tmp_path / "fb.jsonl"
    script = textwrap.dedent(
        f"""
        from mlx_kto.data.feedback import append_row, rating_row
        i = 0
        while True:
            append_row({str(f)!r}, rating_row([{{"role": "user", "content": "q"}}], "x" * 50_000 + str(i), True))
            print("ack", i, flush=True)
            i += 1
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = [p.stdout.readline() for _ in range(15)]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    acked += p.stdout.read().splitlines(keepends=True)  # anything printed before the kill
    n_acked = len([a for a in acked if a.startswith("ack")])
    assert n_acked >= 15
    contents = {e.completion[0]["content"][50_000:] for e in load_examples(f)}
    assert {str(i) for i in range(n_acked)} <= contents


def test_chat_cli_errors_are_one_line(tmp_path, capsys):
    from mlx_kto.cli.app import cli, run

    cases = [
        (["--feedback", str(tmp_path / "nope" / "fb.jsonl")], "feedback: folder"),
        (["--feedback", str(tmp_path)], "is a folder"),
        (
            ["--feedback", str(tmp_path / "fb.jsonl"), "--adapter-path", str(tmp_path)],
            "adapter-path:",
        ),
        (["--feedback", str(tmp_path / "fb.jsonl"), "--top-p", "0"], "top-p: must be in (0, 1]"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) as e:
            run(cli, ["chat", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2, (args, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and msg in lines[0], err


def test_mapping_flags_on_the_train_command():
    from mlx_kto.cli.app import build_config, train_command

    ctx = train_command.make_context(
        "train", ["--label-field", "stars", "--label-threshold", "4", "--messages-field", "conv"]
    )
    params = dict(ctx.params)
    cfg = build_config(params.pop("config_file"), params)
    assert FieldMap.from_config(cfg) == FieldMap(
        label="stars", messages="conv", label_threshold=4.0
    )


def test_data_check_takes_the_mapping_flags(tmp_path, capsys):
    from mlx_kto.cli.app import cli, run

    f = tmp_path / "log.jsonl"
    f.write_text("".join(json.dumps({"q": "Q", "a": "A", "stars": s}) + "\n" for s in (5, 4, 1)))
    args = ["data", "check", str(f), "--prompt-field", "q", "--completion-field", "a"]
    run(cli, [*args, "--label-field", "stars", "--label-threshold", "4"])
    assert "train: 3 rows" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run(cli, [*args, "--label-field", "stars"])  # 5 stars without a threshold
    assert "--label-threshold" in capsys.readouterr().err


def test_torn_line_longer_than_the_scan_window_is_dropped_whole(tmp_path):
    f = tmp_path / "fb.jsonl"
    append_row(f, rating_row(PROMPT, "It is blue.", True))
    whole = f.read_bytes()
    torn = json.dumps(rating_row(PROMPT, "y" * 300_000, False)).encode()[:250_000]
    f.write_bytes(whole + torn)
    append_row(f, rating_row(PROMPT, "Ugh.", False))
    assert f.read_bytes().startswith(whole)
    assert [e.completion[0]["content"] for e in load_examples(f)] == ["It is blue.", "Ugh."]


def test_write_errors_are_user_errors_not_tracebacks(tmp_path, monkeypatch):
    import mlx_kto.data.feedback as fbmod

    f = tmp_path / "fb.jsonl"
    append_row(f, rating_row(PROMPT, "It is blue.", True))

    def no_space(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fbmod.os, "write", no_space)
    with pytest.raises(UserError, match=r"could not write .*No space left on device.*not saved"):
        append_row(f, rating_row(PROMPT, "Ugh.", False))
    monkeypatch.undo()
    assert len(load_examples(f)) == 1


def test_terminal_chat_new_conversation_and_regenerate_in_process(tmp_path):
    """run_terminal_chat with scripted input and a fake model stream: /new drops the
    history from the next prompt; regenerate rates the new reply on the same prompt."""
    from mlx_kto.collect.chat import run_terminal_chat
    from mlx_kto.collect.session import ChatSession

    replies = iter(["First.", "Second.", "Third."])
    session = ChatSession(
        None, None, model_name="fake", feedback=tmp_path / "fb.jsonl", system_prompt="S"
    )
    session.generate = lambda prompt: iter([next(replies)])  # runs on the MLX thread
    lines = iter(["Q1", "/new", "Q2"])
    keys = iter(["u", "r", "d"])  # a rating is the decision: the chat goes on

    def read_line(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = []
    n = run_terminal_chat(session, echo=lambda *a, **k: out.append(" ".join(map(str, a))),
                          read_line=read_line, read_key=lambda: next(keys))  # fmt: skip
    assert n == 2
    rows = read_ratings(session.feedback)
    assert [(r["prompt"], r["completion"][0]["content"], r["label"]) for r in rows] == [
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}], "First.", True),
        ([{"role": "system", "content": "S"}, {"role": "user", "content": "Q2"}], "Third.", False),
    ]
    assert "(new conversation)" in out
