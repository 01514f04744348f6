"""Parquet / arrow files, save_to_disk folders, hub dataset ids, OpenAI content parts."""

import json

from mlx_kto.data.rows import load_examples, load_splits
from mlx_kto.errors import UserError

import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the test extra")
import pyarrow.parquet as pq  # noqa: E402

ROWS = [
    {"prompt": "What is 2+2?", "completion": " 4.", "label": True},
    {"prompt": "What is 3+3?", "completion": " 7.", "label": False},
    {"prompt": "Say hi.", "completion": " Hi!", "label": "thumbs_up"},
]
CHAT = [
    {
        "messages": [
            {"role": "user", "content": "Call the tool."},
            {"role": "assistant", "content": "Done.", "tool_calls": None},
        ],
        "label": True,
    },
    {
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        ],
        "label": False,
    },
]


def _table(rows):
    # Labels of mixed types do not fit one Arrow column: store them as strings.
    return pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in rows])


def test_parquet_file_loads_like_jsonl(tmp_path):
    p = tmp_path / "fb.parquet"
    pq.write_table(_table(ROWS), p)
    ex = load_examples(p)
    assert [e.label for e in ex] == [True, False, True]
    assert ex[0].prompt == "What is 2+2?" and ex[1].where == f"{p}[1]"


def test_parquet_bad_row_is_named(tmp_path):
    p = tmp_path / "fb.parquet"
    pq.write_table(_table([*ROWS, {"prompt": "x", "completion": " y", "label": "maybe"}]), p)
    with pytest.raises(UserError, match=r"fb\.parquet\[3\]: label 'maybe'"):
        load_examples(p)


@pytest.mark.parametrize("fmt", ["file", "stream"])
def test_arrow_ipc_file_and_stream(tmp_path, fmt):
    p = tmp_path / "fb.arrow"
    table = _table(ROWS)
    opener = pa.ipc.new_file if fmt == "file" else pa.ipc.new_stream
    with pa.OSFile(str(p), "wb") as sink, opener(sink, table.schema) as w:
        w.write_table(table)
    assert len(load_examples(p)) == 3


def test_arrow_unified_message_structs_are_cleaned(tmp_path):
    p = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "label": str(r["label"])} for r in CHAT]), p)
    ex = load_examples(p)
    assert ex[0].completion == [{"role": "assistant", "content": "Done."}]  # no tool_calls: None
    assert "content" not in ex[1].completion[0]


def test_folder_of_parquet_splits(tmp_path):
    pq.write_table(_table(ROWS), tmp_path / "train.parquet")
    pq.write_table(_table(ROWS[:2]), tmp_path / "valid.parquet")
    splits = load_splits(tmp_path)
    assert (len(splits["train"]), len(splits["valid"])) == (3, 2)


def test_save_to_disk_dataset_and_datasetdict(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extra")
    rows = [{**r, "label": str(r["label"])} for r in ROWS]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    assert len(load_splits(tmp_path / "one")["train"]) == 3
    dd = datasets.DatasetDict(
        {"train": ds, "validation": datasets.Dataset.from_list(rows[:2]), "other": ds}
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    splits = load_splits(tmp_path / "dict")
    assert (len(splits["train"]), len(splits["valid"])) == (3, 2)
    assert splits["valid"][0].where.startswith(f"{tmp_path / 'dict'}:validation[")
    assert len(load_splits(tmp_path / "dict", split="other")["train"]) == 3
    with pytest.raises(UserError, match="no split 'nope'.*train, validation, other"):
        load_splits(tmp_path / "dict", split="nope")


def test_hub_id_offline_says_unreachable(monkeypatch):
    pytest.importorskip("datasets", reason="datasets is in the test extra")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError) as e:
        load_splits("no-such-owner-xyz/no-such-dataset")
    msg = str(e.value)
    assert "hub is unreachable" in msg and "no such file" not in msg


def test_hub_id_rows_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets", reason="datasets is in the test extra")
    rows = [{**r, "label": str(r["label"])} for r in ROWS]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
    )
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: calls.append(name) or dd)
    splits = load_splits("trl-lib/kto-mix-14k")
    assert calls == ["trl-lib/kto-mix-14k"]
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 3
    assert splits["train"][0].where == "trl-lib/kto-mix-14k:train[0]"
    splits = load_splits("trl-lib/kto-mix-14k", split="test")
    assert len(splits["train"]) == 1


def test_hub_id_without_datasets_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"mlx-kto\[hf\]"):
        load_splits("someone/some-dataset")


def test_missing_local_paths_are_not_hub_ids(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_splits("data/feedback.jsonl")
    with pytest.raises(UserError, match="data_split"):
        load_splits(_write(tmp_path / "x.jsonl", ROWS), split="test")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_openai_content_parts_are_flattened(tmp_path, tokenizer):
    from mlx_kto.data.tokenize import tokenize_examples

    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]
    row = {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": "4."}]},
        ],
        "label": True,
    }
    (ex,) = load_examples(_write(tmp_path / "c.jsonl", [row]))
    assert ex.prompt[0]["content"] == "What is 2+2?" and ex.completion[0]["content"] == "4."
    rows, _ = tokenize_examples([ex], tokenizer, 64)
    text = tokenizer.decode(rows[0].tokens)
    assert "What is 2+2?" in text and "'type'" not in text


def test_non_text_content_part_is_an_error_naming_the_row(tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": "A cat."},
        ],
        "label": True,
    }
    with pytest.raises(
        UserError, match=r"c\.jsonl:1: 'messages'\[0\] content part \[0\] is of type 'image_url'"
    ):
        load_examples(_write(tmp_path / "c.jsonl", [row]))
