"""Loading and validating feedback rows (mlx_kto.data.rows)."""

import json

from mlx_kto.data.rows import Example, load_examples, load_splits, parse_label
from mlx_kto.errors import UserError

import pytest

USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
GREEN = {"role": "assistant", "content": "It is green."}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------
# formats


def test_standard_unpaired(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "The sky is", "completion": " blue.", "label": True},
            {"prompt": "The sky is", "completion": " green.", "label": False, "id": 7},
        ],
    )
    exs = load_examples(f)
    assert [(e.prompt, e.completion, e.label) for e in exs] == [
        ("The sky is", " blue.", True),
        ("The sky is", " green.", False),
    ]
    assert [e.where for e in exs] == [f"{f}:1", f"{f}:2"]
    assert not exs[0].conversational and exs[0].tools is None


def test_conversational_unpaired(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": [USER], "completion": [BLUE], "label": 1},
            {"prompt": [USER], "completion": [GREEN], "label": 0},
        ],
    )
    exs = load_examples(f)
    assert exs[0].prompt == [USER] and exs[0].completion == [BLUE] and exs[0].label is True
    assert exs[1].completion == [GREEN] and exs[1].label is False
    assert exs[0].conversational


def test_chat_log_last_assistant_is_completion(tmp_path):
    sys_msg = {"role": "system", "content": "Be brief."}
    msgs = [sys_msg, USER, BLUE, {"role": "user", "content": "Sure?"}, GREEN]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs, "label": "thumbs_down"}])
    (ex,) = load_examples(f)
    assert ex.prompt == msgs[:-1]
    assert ex.completion == [GREEN]
    assert ex.label is False


def test_tools_and_template_kwargs(tmp_path):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"messages": [USER, BLUE], "label": True, "tools": [tool]},
            {"messages": [USER, GREEN], "label": False, "tools": json.dumps([tool])},
            {
                "messages": [USER, BLUE],
                "label": True,
                "chat_template_kwargs": {"enable_thinking": False},
            },
        ],
    )
    a, b, c = load_examples(f)
    assert a.tools == [tool] and b.tools == [tool] and c.tools is None
    assert c.chat_template_kwargs == {"enable_thinking": False} and a.chat_template_kwargs is None


def test_assistant_tool_call_message_without_content(tmp_path):
    call = {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, call], "label": True}])
    (ex,) = load_examples(f)
    assert ex.completion == [call]


def _paired_rows(n):
    return [
        {"prompt": f"Question {i}?", "chosen": f" good {i}", "rejected": f" bad {i}"}
        for i in range(n)
    ]


def test_paired_unpaired_to_both_labels(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", _paired_rows(20))
    exs = load_examples(f, seed=0)
    assert len(exs) == 40
    by_prompt = {}
    for e in exs:
        by_prompt.setdefault(e.prompt, {})[e.label] = e.completion
    assert len(by_prompt) == 20
    for i in range(20):
        assert by_prompt[f"Question {i}?"] == {True: f" good {i}", False: f" bad {i}"}
    # shuffled: the unshuffled TRL order would be chosen/rejected alternating per prompt
    labels = [e.label for e in exs]
    assert labels != [True, False] * 20 and labels != [True] * 20 + [False] * 20
    # every pair keeps the row's location
    assert all(e.where.startswith(f"{f}:") for e in exs)


def test_paired_shuffle_deterministic_by_seed(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", _paired_rows(20))
    key = lambda exs: [(e.prompt, e.label) for e in exs]  # noqa: E731
    assert key(load_examples(f, seed=3)) == key(load_examples(f, seed=3))
    assert key(load_examples(f, seed=3)) != key(load_examples(f, seed=4))


def test_mixed_paired_and_unpaired_rows_are_all_shuffled(tmp_path):
    rows = [{"prompt": f"U{i}", "completion": " x", "label": True} for i in range(20)]
    rows.append({"prompt": "P", "chosen": " a", "rejected": " b"})
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    exs = load_examples(f, seed=1)
    assert len(exs) == 22
    assert [e.prompt for e in exs[:20]] != [f"U{i}" for i in range(20)]


def test_unpaired_file_keeps_order(tmp_path):
    rows = [{"prompt": f"P{i}", "completion": " x", "label": i % 2 == 0} for i in range(30)]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [e.prompt for e in load_examples(f, seed=5)] == [f"P{i}" for i in range(30)]


def test_paired_conversational_with_prompt(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN]}]
    )
    exs = sorted(load_examples(f), key=lambda e: not e.label)
    assert [(e.prompt, e.completion, e.label) for e in exs] == [
        ([USER], [BLUE], True),
        ([USER], [GREEN], False),
    ]


def test_promptless_pair_lists_common_prefix(tmp_path):
    follow = {"role": "user", "content": "And the grass?"}
    chosen = [USER, BLUE, follow, {"role": "assistant", "content": "Green."}]
    rejected = [USER, BLUE, follow, {"role": "assistant", "content": "Go away."}]
    f = write_jsonl(tmp_path / "d.jsonl", [{"chosen": chosen, "rejected": rejected}])
    exs = sorted(load_examples(f), key=lambda e: not e.label)
    assert exs[0].prompt == exs[1].prompt == [USER, BLUE, follow]
    assert exs[0].completion == [chosen[-1]] and exs[0].label is True
    assert exs[1].completion == [rejected[-1]] and exs[1].label is False


def test_promptless_pair_strings_common_prefix(tmp_path):
    f = write_jsonl(
        tmp_path / "d.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    )
    exs = sorted(load_examples(f), key=lambda e: not e.label)
    # the space before the differing word goes to the completions (TRL extract_prompt)
    assert exs[0].prompt == exs[1].prompt == "The sky is"
    assert (exs[0].completion, exs[1].completion) == (" blue.", " green.")


def test_promptless_pair_strings_mid_word(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"chosen": "Answer: yes", "rejected": "Answer: yeah"}])
    exs = sorted(load_examples(f), key=lambda e: not e.label)
    assert exs[0].prompt == "Answer: ye"
    assert (exs[0].completion, exs[1].completion) == ("s", "ah")


def test_json_file_list_and_data_key(tmp_path):
    rows = [
        {"prompt": "a", "completion": " b", "label": "good"},
        {"prompt": "c", "completion": " d", "label": "bad"},
    ]
    f1 = tmp_path / "list.json"
    f1.write_text(json.dumps(rows))
    f2 = tmp_path / "dict.json"
    f2.write_text(json.dumps({"data": rows}))
    for f in (f1, f2):
        exs = load_examples(f)
        assert [e.label for e in exs] == [True, False]
        assert [e.where for e in exs] == [f"{f}[0]", f"{f}[1]"]


def test_blank_lines_and_bom(tmp_path):
    f = tmp_path / "d.jsonl"
    row = json.dumps({"prompt": "a", "completion": " b", "label": True})
    f.write_text("\ufeff" + row + "\n\n   \n" + row + "\n", encoding="utf-8")
    exs = load_examples(f)
    assert [e.where for e in exs] == [f"{f}:1", f"{f}:4"]


# ---------------------------------------------------------------------------
# labels

TRUE_SPELLINGS = [True, 1, 1.0, "1", "true", "True", "TRUE", " true ", "good", "Good", "up", "UP"]
TRUE_SPELLINGS += ["thumbs_up", "Thumbs_Up", "thumbs up", "thumbs-up", "👍", "desirable", "yes"]
FALSE_SPELLINGS = [False, 0, 0.0, -1, "0", "false", "False", "bad", "BAD", "down", "Down"]
FALSE_SPELLINGS += ["thumbs_down", "thumbs down", "thumbs-down", "👎", "undesirable", "no", "No"]


@pytest.mark.parametrize("value", TRUE_SPELLINGS)
def test_label_true_spellings(value):
    assert parse_label(value, "f:1") is True


@pytest.mark.parametrize("value", FALSE_SPELLINGS)
def test_label_false_spellings(value):
    assert parse_label(value, "f:1") is False


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, 0.5, [True], {"v": 1}, "truee"])
def test_label_rejects_other_values(value):
    with pytest.raises(UserError, match=r"^f:3: label .* is not a thumbs-up/down value \(use true"):
        parse_label(value, "f:3")


def test_label_error_names_file_line_and_value(tmp_path):
    rows = [{"prompt": "a", "completion": " b", "label": True}] * 16
    rows.append({"prompt": "a", "completion": " b", "label": "maybe"})
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(UserError, match=r"train\.jsonl:17: label 'maybe' is not a thumbs-up/down"):
        load_examples(f)


def test_label_null_and_missing(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b", "label": None}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: label is null"):
        load_examples(f)
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(UserError, match=r"d\.jsonl:1: row has no 'label'"):
        load_examples(f)


# ---------------------------------------------------------------------------
# malformed input: one line naming file:line and field

OK = {"prompt": "a", "completion": " b", "label": True}
BAD_ROWS = [
    ("{not json", r"d\.jsonl:2: invalid JSON"),
    ({"prompt": "a", "label": True}, r"d\.jsonl:2: row has no 'completion'"),
    ({"completion": " b", "label": True}, r"d\.jsonl:2: row has no 'prompt'"),
    ({"prompt": 5, "completion": " b", "label": True}, r"d\.jsonl:2: 'prompt' must be a string"),
    ({"prompt": "a", "completion": None, "label": True}, r"d\.jsonl:2: 'completion' is null"),
    ({"prompt": "a", "completion": "", "label": True}, r"d\.jsonl:2: 'completion' is empty"),
    ([1, 2], r"d\.jsonl:2: each row must be a JSON object, got list"),
    (
        {"prompt": "a", "completion": [BLUE], "label": True},
        r"d\.jsonl:2: 'prompt' is a string but 'completion' is a message list",
    ),
]


@pytest.mark.parametrize("bad,pattern", BAD_ROWS)
def test_bad_standard_rows(tmp_path, bad, pattern):
    f = write_jsonl(tmp_path / "d.jsonl", [OK, bad, OK])
    with pytest.raises(UserError, match=pattern):
        load_examples(f)


BAD_CHAT_ROWS = [
    (
        {"prompt": [{"content": "hi"}], "completion": [BLUE], "label": 1},
        r"d\.jsonl:2: 'prompt'\[0\] has no 'role'",
    ),
    (
        {"prompt": [USER], "completion": [{"role": "assistant"}], "label": 1},
        r"d\.jsonl:2: 'completion'\[0\] \(role 'assistant'\) has no 'content'",
    ),
    (
        {"prompt": [USER], "completion": ["hi"], "label": 1},
        r"d\.jsonl:2: 'completion'\[0\] must be a message object",
    ),
    (
        {"prompt": [USER], "completion": [], "label": 1},
        r"d\.jsonl:2: 'completion' must be a non-empty",
    ),
    ({"prompt": [], "completion": [BLUE], "label": 1}, r"d\.jsonl:2: 'prompt' must be a non-empty"),
    (
        {"messages": [BLUE, USER], "label": 1},
        r"d\.jsonl:2: the last message of 'messages' must be the assistant's reply.*'user'",
    ),
    ({"messages": [BLUE], "label": 1}, r"d\.jsonl:2: 'messages' has no prompt before"),
    (
        {"messages": [USER, {"role": "assistant", "content": ""}], "label": 1},
        r"d\.jsonl:2: the assistant's reply in 'messages' is empty",
    ),
    (
        {"prompt": [USER], "completion": [{"role": "assistant", "content": ""}], "label": 0},
        r"d\.jsonl:2: 'completion' is empty",
    ),
    (
        {"prompt": [USER], "chosen": [BLUE], "rejected": [{"role": "assistant", "content": ""}]},
        r"d\.jsonl:2: 'rejected' is empty$",
    ),
    ({"messages": [USER, BLUE]}, r"d\.jsonl:2: row has no 'label'"),
    ({"messages": "hi", "label": 1}, r"d\.jsonl:2: 'messages' must be a non-empty list"),
    (
        {"messages": [USER, BLUE], "label": 1, "tools": "{oops"},
        r"d\.jsonl:2: 'tools' is a string but not valid JSON",
    ),
    ({"messages": [USER, BLUE], "label": 1, "tools": 3}, r"d\.jsonl:2: 'tools' must be a list"),
    (
        {"messages": [USER, BLUE], "label": 1, "chat_template_kwargs": [1]},
        r"d\.jsonl:2: 'chat_template_kwargs' must be an object",
    ),
    ({"prompt": [USER], "chosen": [BLUE]}, r"d\.jsonl:2: paired row has no 'rejected'"),
    (
        {"chosen": [USER, BLUE], "rejected": [BLUE]},
        r"d\.jsonl:2: 'chosen' and 'rejected' share no leading messages",
    ),
    (
        {"chosen": [USER, BLUE], "rejected": [USER]},
        r"d\.jsonl:2: 'rejected' is empty after removing the prompt",
    ),
    (
        {"prompt": [USER], "chosen": [BLUE], "rejected": [GREEN], "label": True},
        r"d\.jsonl:2: row mixes paired .* and unpaired \('label'\)",
    ),
]


@pytest.mark.parametrize("bad,pattern", BAD_CHAT_ROWS)
def test_bad_conversational_rows(tmp_path, bad, pattern):
    ok = {"prompt": [USER], "completion": [BLUE], "label": True}
    f = write_jsonl(tmp_path / "d.jsonl", [ok, bad, ok])
    with pytest.raises(UserError, match=pattern):
        load_examples(f)


def test_standard_and_conversational_rows_do_not_mix(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [OK, {"messages": [USER, BLUE], "label": True}])
    with pytest.raises(
        UserError, match=r"d\.jsonl:2: row is conversational .* first row \(line 1\) is standard"
    ):
        load_examples(f)


def test_empty_files(tmp_path):
    for name, text in [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=rf"{name}: no rows \(empty file\)"):
            load_examples(tmp_path / name)


def test_bad_json_files(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('{"rows": []}')
    with pytest.raises(UserError, match=r"d\.json: expected a list of rows"):
        load_examples(f)
    f.write_text('[{"prompt": "a", "completion": " b", "label": 1},\n {"prompt": ]')
    with pytest.raises(UserError, match=r"d\.json:2: invalid JSON"):
        load_examples(f)
    f.write_text(json.dumps([OK, {"prompt": "a", "completion": "", "label": 1}]))
    with pytest.raises(UserError, match=r"d\.json\[1\]: 'completion' is empty"):
        load_examples(f)


def test_unknown_extension_and_missing_path(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("prompt,completion,label\n")
    with pytest.raises(UserError, match=r"d\.csv: unsupported file type '\.csv'"):
        load_examples(f)
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"nope: no such file or folder"):
        load_splits(tmp_path / "nope")
    with pytest.raises(UserError, match="is a folder"):
        load_examples(tmp_path)


# ---------------------------------------------------------------------------
# splits


def test_load_splits_file_is_train(tmp_path):
    f = write_jsonl(tmp_path / "fb.jsonl", [OK, OK])
    splits = load_splits(f)
    assert list(splits) == ["train"] and len(splits["train"]) == 2


def test_load_splits_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [OK] * 3)
    write_jsonl(tmp_path / "valid.jsonl", [OK] * 2)
    (tmp_path / "test.json").write_text(json.dumps([OK]))
    splits = load_splits(tmp_path)
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "valid": 2, "test": 1}
    assert all(isinstance(e, Example) for e in splits["test"])


def test_load_splits_only_present_and_validation_alias(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [OK] * 3)
    assert list(load_splits(tmp_path)) == ["train"]
    write_jsonl(tmp_path / "validation.jsonl", [OK])
    assert set(load_splits(tmp_path)) == {"train", "valid"}
    write_jsonl(tmp_path / "valid.jsonl", [OK])
    with pytest.raises(UserError, match="several valid files"):
        load_splits(tmp_path)


def test_load_splits_missing_train(tmp_path):
    write_jsonl(tmp_path / "valid.jsonl", [OK])
    with pytest.raises(UserError, match=r"no train\.jsonl"):
        load_splits(tmp_path)


def test_load_splits_error_names_split_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [OK])
    write_jsonl(tmp_path / "valid.jsonl", [OK, {"prompt": "a", "completion": " b", "label": "?"}])
    with pytest.raises(UserError, match=r"valid\.jsonl:2: label '\?'"):
        load_splits(tmp_path)
