"""Bad input to `mlx-kto data import open-webui`, feedback files and save_to_disk folders:
one `error:` line naming the file and field, exit 2, nothing existing lost or
half-written, no stray temp file. Each class is also hit with random values of every
JSON type in every field the importer reads (no input ends in a traceback)."""

import copy
import errno
import json
import os
import pathlib
import random
from pathlib import Path

from mlx_kto.cli.app import cli, run
from mlx_kto.collect.importers import read_open_webui
from mlx_kto.data.feedback import rating_row
from mlx_kto.data.rows import load_examples
from mlx_kto.errors import UserError

import pytest
from chat_procs import run_cli

FIX = Path(__file__).parent / "fixtures"
FEEDBACK = json.loads((FIX / "open_webui_feedback_export.json").read_text())
CHATS = json.loads((FIX / "open_webui_chat_export.json").read_text())


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def refused(capsys, args, *needles):
    """Run `mlx-kto ARGS` (what the console script runs): exit 2, one error line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(cli, [str(a) for a in args], "mlx-kto")
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def export(tmp_path, records, name="export.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(records))
    return p


# -- import: the output -------------------------------------------------------------


def test_output_that_is_a_folder_is_refused_even_with_force(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    refused(capsys, ["data", "import", "open-webui", FIX / "open_webui_feedback_export.json",
                     "-o", tmp_path / "out", "--force"], "is a folder")  # fmt: skip
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["ratings.txt", "ratings.parquet", "ratings"])
def test_output_name_train_cannot_read_is_refused(tmp_path, capsys, name):
    refused(capsys, ["data", "import", "open-webui", FIX / "open_webui_feedback_export.json",
                     "-o", tmp_path / name], ".jsonl", ".json")  # fmt: skip
    assert snapshot(tmp_path) == {}


def test_output_named_json_is_a_json_list_that_trains(tmp_path):
    """`-o ratings.json` used to hold JSON lines that `train` rejects; now a JSON list."""
    out = tmp_path / "ratings.json"
    run_cli(["data", "import", "open-webui", FIX / "open_webui_feedback_export.json", "-o", out],
            tmp_path)  # fmt: skip
    assert isinstance(json.loads(out.read_text()), list)
    assert [e.label for e in load_examples(out)] == [True, False, False]
    run_cli(["data", "check", out], tmp_path)


@pytest.mark.parametrize(
    "code, needle", [(errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system")]
)
def test_full_or_read_only_disk_keeps_the_existing_output(tmp_path, capsys, monkeypatch, code, needle):  # fmt: skip
    out = tmp_path / "ratings.jsonl"
    out.write_text('{"keep": "me"}\n')
    before = snapshot(tmp_path)
    real = pathlib.Path.write_bytes

    def failing(self, data):
        real(self, data[: len(data) // 2])  # half a file, then the disk gives out
        raise OSError(code, os.strerror(code), str(self))

    monkeypatch.setattr(pathlib.Path, "write_bytes", failing)
    refused(capsys, ["data", "import", "open-webui", FIX / "open_webui_feedback_export.json",
                     "-o", out, "--force"], "ratings.jsonl", needle)  # fmt: skip
    assert snapshot(tmp_path) == before  # the old file whole, no temp file left


# -- import: the records ------------------------------------------------------------


def _edit(records, path, value):
    obj = records
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return records


HIST = [0, "snapshot", "chat", "chat", "history", "messages"]


@pytest.mark.parametrize(
    "path, value, needle",
    [
        ([0, "meta", "message_id"], ["a2"], "meta.message_id must be a string, not a list"),
        (
            [0, "meta", "message_id"],
            {"id": "a2"},
            "meta.message_id must be a string, not an object",
        ),  # fmt: skip
        ([2, "meta", "message_index"], "3", "meta.message_index must be an integer"),
        ([0, "meta"], ["a2"], "meta must be an object"),
        ([0, "id"], ["fb-1"], "id must be a string"),
        ([0, "meta", "chat_id"], {"x": 1}, "meta.chat_id must be a string"),
        (HIST, "a2", "history.messages must be an object"),
        ([*HIST, "a2", "parentId"], ["u2"], "parentId must be a string"),
        ([*HIST, "a2"], ["not", "a", "message"], "must be a message object"),
        ([0, "snapshot", "chat", "chat", "params"], ["x"], "params must be an object"),
        (
            [0, "snapshot", "chat", "chat", "params", "system"],
            ["x"],
            "params.system must be a string",
        ),  # fmt: skip
        ([0, "snapshot", "chat"], ["x"], "snapshot.chat must be an object"),
        ([0, "data", "rating"], [1], "data.rating is [1]"),
    ],
)
def test_a_field_of_the_wrong_type_is_one_line(tmp_path, capsys, path, value, needle):
    p = export(tmp_path, _edit(copy.deepcopy(FEEDBACK), path, value))
    refused(capsys, ["data", "import", "open-webui", p, "-o", tmp_path / "out.jsonl"],
            "export.json[", needle)  # fmt: skip
    assert not (tmp_path / "out.jsonl").exists()


def test_history_messages_as_a_list(tmp_path, capsys):
    """A list of messages works when each carries its id; without ids it is refused."""
    records = copy.deepcopy(FEEDBACK)
    tree = records[0]["snapshot"]["chat"]["chat"]["history"]
    tree["messages"] = list(tree["messages"].values())
    rows, _ = read_open_webui(export(tmp_path, records))
    assert rows[0]["completion"][0]["content"].startswith("Put the egg")
    for m in tree["messages"]:
        del m["id"]
    p = export(tmp_path, records, "no_ids.json")
    refused(capsys, ["data", "import", "open-webui", p, "-o", tmp_path / "o.jsonl"],
            "history.messages[0] has no 'id'")  # fmt: skip
    chats = copy.deepcopy(CHATS)
    msgs = chats[0]["chat"]["history"]["messages"]
    chats[0]["chat"]["history"]["messages"] = [{k: v for k, v in m.items() if k != "id"} for m in msgs.values()]  # fmt: skip
    refused(capsys, ["data", "import", "open-webui", export(tmp_path, chats, "chats.json"),
                     "-o", tmp_path / "o.jsonl"], "has no 'id'")  # fmt: skip


def test_the_same_record_twice_keeps_the_later_rating_and_says_so(tmp_path, capsys):
    first = copy.deepcopy(FEEDBACK[0])
    later = _edit(copy.deepcopy(FEEDBACK[0]), ["data", "rating"], -1)
    p = export(tmp_path, [first, FEEDBACK[1], later])
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    run(cli, ["data", "import", "open-webui", str(p), "-o", str(out)], "mlx-kto")
    err = capsys.readouterr().err
    assert "1 record(s) rate a message rated earlier" in err and "1 changed the label" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [("fb-2", False), ("fb-1", False)]
    # The chat export too: the same chat twice gives each rated message once.
    rows_twice, _ = read_open_webui(export(tmp_path, CHATS + CHATS, "chats.json"))
    run(cli, ["data", "import", "open-webui", str(tmp_path / "chats.json"), "-o",
              str(tmp_path / "c.jsonl")], "mlx-kto")  # fmt: skip
    assert len(load_examples(tmp_path / "c.jsonl")) == len(rows_twice) // 2


@pytest.mark.parametrize(
    "content, needle",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('[{"data": {"rating": ' + "1" * 5000 + "}}]", "invalid JSON"),
        ("[1, 2", "invalid JSON"),
    ],
)
def test_malformed_export_file(tmp_path, capsys, content, needle):
    p = tmp_path / "export.json"
    p.write_text(content)
    refused(capsys, ["data", "import", "open-webui", p, "-o", tmp_path / "o.jsonl"], needle)


def test_export_that_is_a_folder(tmp_path, capsys):
    refused(capsys, ["data", "import", "open-webui", tmp_path, "-o", tmp_path / "o.jsonl"],
            "is a folder")  # fmt: skip


def _paths(obj, prefix=()):
    """Every (container path) in a JSON value, for mutation."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


VALUES = [None, True, 0, 7, -1, 1.5, "", "x", "a2", [], ["a2"], [1], {}, {"id": "a2"}, [[]]]


@pytest.mark.parametrize("source", ["feedback", "chats"])
def test_no_export_ends_in_a_traceback(tmp_path, source):
    """Every field of both fixtures replaced by values of every JSON type, one at a
    time and a few at once: rows or a UserError, never another exception."""
    base = FEEDBACK if source == "feedback" else CHATS
    paths = [p for p in _paths(base) if p]
    rng = random.Random(0)
    outcomes = {"rows": 0, "refused": 0}
    trials = [[p] for p in paths] + [rng.sample(paths, 3) for _ in range(300)]
    for trial in trials:
        records = copy.deepcopy(base)
        for path in trial:
            try:
                _edit(records, path, rng.choice(VALUES))
            except (KeyError, IndexError, TypeError):  # an earlier edit removed the parent
                pass
        p = export(tmp_path, records)
        try:
            rows, _ = read_open_webui(p)
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        outcomes["rows"] += 1
        for r in rows:  # what it did produce is a valid row
            assert isinstance(r["id"], str) and isinstance(r["label"], bool)
            assert all(isinstance(m.get("content"), str) for m in r["prompt"] + r["completion"])
    assert outcomes["rows"] and outcomes["refused"]


# -- feedback files and save_to_disk folders -----------------------------------------


def _rating(**kw):
    return {**rating_row([{"role": "user", "content": "hi"}], "Hello.", True), **kw}


@pytest.mark.parametrize(
    "rows, needle",
    [
        ([_rating(id="a"), {"retract": ["a"]}], "fb.jsonl:2: 'retract' must be the id (a string)"),
        ([_rating(id="a"), {"retract": {"id": "a"}}], "fb.jsonl:2: 'retract' must be"),
        ([_rating(id="a"), {"retract": ""}], "not an empty string"),
        ([_rating(id=["a"]), _rating(id="b"), {"retract": "b"}], "fb.jsonl:1: 'id' must be"),
        ([_rating(id={"a": 1}), {"retract": "a"}], "fb.jsonl:1: 'id' must be"),
    ],
)
def test_malformed_retraction_or_id(tmp_path, capsys, rows, needle):
    fb = tmp_path / "fb.jsonl"
    fb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(capsys, ["data", "check", fb], needle)
    refused(capsys, ["train", "--data", fb, "--model", Path(__file__).parents[1] / "mlx_kto/demo/assets/model",
                     "--adapter-path", tmp_path / "run", "--iters", "1"], needle)  # fmt: skip
    assert not (tmp_path / "run" / "adapters.safetensors").exists()


def test_numeric_ids_are_not_retractable_but_load(tmp_path):
    fb = tmp_path / "fb.jsonl"
    rows = [_rating(id=5), _rating(id="b", label=False), {"retract": "b"}, _rating(id=None)]
    fb.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples(fb)) == 2


def _saved(tmp_path, files: dict) -> Path:
    d = tmp_path / "saved"
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return d


@pytest.mark.parametrize(
    "files, needle",
    [
        ({"dataset_dict.json": "[1, 2]"}, 'expected {"splits"'),
        ({"dataset_dict.json": '{"splits": "train"}'}, "'splits' must be a non-empty list"),
        ({"dataset_dict.json": '{"splits": [1]}'}, "'splits' holds 1"),
        ({"dataset_dict.json": '{"splits": ["../x"]}'}, "not a name in this folder"),
        ({"dataset_dict.json": '{"splits": {"train": 1}}'}, "'splits' must be"),
        ({"dataset_dict.json": '{"splits": ["train"]}'}, "split 'train' has no folder"),
        ({"dataset_dict.json": '{"splits": '}, "invalid JSON"),
        ({"dataset_dict.json": "[" * 100_000}, "nested too deeply"),
        ({"state.json": '{"_data_files": [{"filename": 5}]}'}, "'_data_files' holds 5"),
        ({"state.json": '{"_data_files": "x"}'}, "'_data_files' must be"),
        ({"state.json": '{"_data_files": [{"filename": "../../etc/passwd"}]}'}, "not a name"),
        ({"state.json": "[]"}, "expected an object"),
        ({"dataset_dict.json": '{"splits": ["train"]}', "train/state.json": "{}"}, "_data_files"),
    ],
)
def test_malformed_save_to_disk_folder(tmp_path, capsys, files, needle):
    d = _saved(tmp_path, files)
    refused(capsys, ["data", "check", d], needle)
