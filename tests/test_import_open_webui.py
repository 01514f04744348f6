"""`mlx-kto data import open-webui`: both export shapes (fixtures built from Open
WebUI's feedback / chat models), every row checked against the expected
prompt / completion / label, and one-line errors for bad records."""

import json
import shutil
from pathlib import Path

from mlx_kto.cli.app import cli, run
from mlx_kto.collect.importers import import_open_webui, read_open_webui
from mlx_kto.data.rows import load_examples
from mlx_kto.errors import UserError

import pytest

FIX = Path(__file__).parent / "fixtures"
SYSTEM = {"role": "system", "content": "You are a patient cooking assistant."}
U1 = {"role": "user", "content": "How do I boil an egg?"}
A1 = {"role": "assistant", "content": "Figure it out."}
U2 = {"role": "user", "content": "Please, step by step?"}
A2 = {"role": "assistant", "content": "Put the egg in boiling water for 8 minutes, then cool it."}


def triples(rows):
    return [(r["prompt"], r["completion"], r["label"]) for r in rows]


def test_feedback_export_rows():
    rows, skipped = read_open_webui(FIX / "open_webui_feedback_export.json")
    assert skipped == 1  # fb-4 has no rating (a comment only)
    assert triples(rows) == [
        # fb-1: the rated reply a2 is on a branch that is not the chat's current one
        ([SYSTEM, U1, A1, U2], [A2], True),
        # fb-2: a rating on the first reply of a multi-turn chat: prompt is the history before it
        ([SYSTEM, U1], [A1], False),
        # fb-3: older snapshot without a tree: meta.message_index (1-based) picks the message
        (
            [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And of Italy?"},
            ],
            [{"role": "assistant", "content": "Paris again."}],
            False,
        ),
    ]
    assert [r["id"] for r in rows] == ["fb-1", "fb-2", "fb-3"]
    assert rows[0]["meta"]["reason"] == "helpful" and rows[0]["meta"]["chat_id"] == "chat-1"
    assert rows[2]["meta"]["comment"] == "wrong city" and rows[2]["meta"]["model"] == "qwen2.5:0.5b"


def test_chat_export_rows():
    rows, skipped = read_open_webui(FIX / "open_webui_chat_export.json")
    assert skipped == 1  # a2b has no annotation
    got = sorted(triples(rows), key=lambda t: json.dumps(t))
    hi = {"role": "user", "content": "Say hi."}
    want = [
        ([SYSTEM, U1, A1, U2], [A2], True),
        ([SYSTEM, U1], [A1], False),
        ([hi], [{"role": "assistant", "content": "Hi! How can I help?"}], True),  # sibling replies
        ([hi], [{"role": "assistant", "content": "No."}], False),  # of one prompt
    ]
    assert got == sorted(want, key=lambda t: json.dumps(t))
    assert len({r["id"] for r in rows}) == 4


def test_cli_import_writes_a_file_that_trains(tmp_path):
    out = tmp_path / "fb.jsonl"
    run(
        cli,
        [
            "data",
            "import",
            "open-webui",
            str(FIX / "open_webui_feedback_export.json"),
            "-o",
            str(out),
        ],
    )
    ex = load_examples(out)
    assert [e.label for e in ex] == [True, False, False]
    assert ex[0].prompt == [SYSTEM, U1, A1, U2] and ex[0].completion == [A2]
    # Existing output is not overwritten without --force.
    with pytest.raises(SystemExit) as e:
        run(
            cli,
            [
                "data",
                "import",
                "open-webui",
                str(FIX / "open_webui_chat_export.json"),
                "-o",
                str(out),
            ],
        )
    assert e.value.code == 2
    assert len(load_examples(out)) == 3
    run(
        cli,
        [
            "data",
            "import",
            "open-webui",
            str(FIX / "open_webui_chat_export.json"),
            "-o",
            str(out),
            "--force",
        ],
    )
    assert len(load_examples(out)) == 4


def _broken(tmp_path, edit):
    records = json.loads((FIX / "open_webui_feedback_export.json").read_text())
    edit(records)
    p = tmp_path / "export.json"
    p.write_text(json.dumps(records))
    return p


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda r: r[0]["data"].update(rating=5),
            r"export.json\[0\]: data.rating is 5; expected 1",
        ),
        (lambda r: r[1]["data"].update(rating="maybe"), r"\[1\]: data.rating is 'maybe'"),
        (
            lambda r: r[0]["meta"].update(message_id="u2"),
            r"\[0\]: the rated message is a 'user' message",
        ),
        (
            lambda r: r[2]["meta"].update(message_index=9),
            r"\[2\]: meta.message_id 'm4-missing-id' is not in the snapshot and meta.message_index 9",
        ),
        (lambda r: r[0].pop("snapshot"), r"\[0\]: 'snapshot.chat' is missing"),
        (
            lambda r: [r[1]["snapshot"]["chat"]["chat"].pop(k) for k in ("history", "messages")],
            r"\[1\]: snapshot.chat has no 'history' or 'messages'",
        ),
        (lambda r: r.append({"hello": 1}), r"\[4\]: neither a feedback record"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, edit, match):
    p = _broken(tmp_path, edit)
    with pytest.raises(UserError, match=match):
        read_open_webui(p)


def test_bad_chat_annotation_and_bad_json(tmp_path):
    chats = json.loads((FIX / "open_webui_chat_export.json").read_text())
    chats[1]["chat"]["history"]["messages"]["w2"]["annotation"]["rating"] = 0
    p = tmp_path / "chats.json"
    p.write_text(json.dumps(chats))
    with pytest.raises(UserError, match=r"chats.json\[1\] message 'w2': annotation.rating is 0"):
        read_open_webui(p)
    p.write_text("[{")
    with pytest.raises(UserError, match=r"chats.json:1: invalid JSON"):
        read_open_webui(p)


def test_failed_import_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "fb.jsonl"
    shutil.copy(FIX / "open_webui_feedback_export.json", tmp_path / "ok.json")
    import_open_webui(tmp_path / "ok.json", out)
    before = out.read_bytes()
    bad = _broken(tmp_path, lambda r: r[0]["data"].update(rating=3))
    with pytest.raises(UserError):
        import_open_webui(bad, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
