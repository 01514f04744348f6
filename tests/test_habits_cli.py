"""data check report, --chat-template override, generate flags (mlx_lm.generate's)."""

import json
import re

from mlx_kto.cli.app import cli
from mlx_kto.errors import UserError

import pytest
from click.testing import CliRunner

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def no_template_model(tmp_path_factory):
    """The tiny Llama with a tokenizer that has no chat template."""
    from toy import build_model, build_tokenizer

    tok_dir = tmp_path_factory.mktemp("tok_plain")
    build_tokenizer(tok_dir, chat_template=None)
    return build_model(tmp_path_factory.mktemp("plain"), tokenizer_dir=tok_dir, seed=0)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat_rows():
    return [
        {
            "messages": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "It is blue."},
            ],
            "label": True,
        },
        {
            "messages": [
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Go away."},
            ],
            "label": False,
        },
    ]


def invoke(args, **kw):
    return CliRunner().invoke(cli, args, catch_exceptions=False, **kw)


# ---------------------------------------------------------------------------
# data check


def test_data_check_reports_format_shapes_and_a_rendered_example(tmp_path, tiny_llama):
    rows = [
        {"prompt": "What is two plus two?", "chosen": " Four.", "rejected": " Five."},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "Say hello.", "completion": " Hello!", "label": "up"},
    ]
    p = _write(tmp_path / "mixed.jsonl", rows)
    res = invoke(["data", "check", str(p), "--model", str(tiny_llama), "--max-length", "64"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "train: 5 rows from 3 input rows (jsonl file)" in out
    assert "format: standard" in out
    assert "1 paired (prompt/chosen/rejected) -> 2 rows" in out
    assert "1 paired, implicit prompt (chosen/rejected) -> 2 rows" in out
    assert "1 unpaired (prompt/completion/label) -> 1 rows" in out
    assert "<<<COMPLETION>>>" in out and "tokens before truncation" in out


def test_data_check_marks_the_chat_template_boundary(tmp_path, tiny_llama):
    p = _write(tmp_path / "chat.jsonl", _chat_rows())
    res = invoke(["data", "check", str(p), "--model", str(tiny_llama)])
    assert res.exit_code == 0, res.output
    assert "format: conversational" in res.output
    assert "2 chat log (messages/label) -> 2 rows" in res.output
    line = next(x for x in res.output.splitlines() if "<<<COMPLETION>>>" in x and "<|" in x)
    prompt, completion = line.split("<<<COMPLETION>>>")
    assert prompt.rstrip().endswith("<|assistant|>")  # the generation prompt is the prompt's
    assert completion.startswith("It is blue.")


def test_data_check_shows_what_truncation_does(tmp_path, tokenizer):
    from mlx_kto.data.check import data_check_lines
    from mlx_kto.data.rows import load_examples
    from mlx_kto.data.tokenize import encode_example

    rows = [
        {"prompt": "word " * n, "completion": " and more words here " * 3, "label": n % 2 == 0}
        for n in (2, 6, 12, 20)
    ]
    p = _write(tmp_path / "long.jsonl", rows)
    examples = load_examples(p)
    lens = [tuple(map(len, encode_example(e, tokenizer)[:2])) for e in examples]
    max_len = 16
    n_drop = sum(lp >= max_len for lp, _ in lens)
    n_cut = sum(lp < max_len < lp + lc for lp, lc in lens)
    text = "\n".join(data_check_lines(p, tokenizer, max_len))
    assert f"{n_cut} completions cut" in text and f"{n_drop} rows dropped" in text
    assert n_drop > 0 and n_cut > 0
    # keep_end prompts: no row is dropped any more, every long prompt is cut
    text = "\n".join(data_check_lines(p, tokenizer, max_len, max_prompt_length=8))
    n_long = sum(lp > 8 for lp, _ in lens)
    assert f"{n_long} prompts cut to their last 8 tokens" in text
    assert "0 rows dropped" in text


# ---------------------------------------------------------------------------
# --chat-template


def test_missing_template_error_names_the_flag(tmp_path, no_template_model):
    p = _write(tmp_path / "chat.jsonl", _chat_rows())
    res = CliRunner().invoke(cli, ["data", "check", str(p), "--model", str(no_template_model)])
    assert res.exit_code != 0
    assert "--chat-template" in str(res.exception) or "--chat-template" in res.output


def test_chat_template_string_and_file(tmp_path, no_template_model):
    p = _write(tmp_path / "chat.jsonl", _chat_rows())
    res = invoke(
        ["data", "check", str(p), "--model", str(no_template_model), "--chat-template", TEMPLATE]
    )
    assert res.exit_code == 0, res.output
    assert "[user] What color is the sky?" in res.output
    f = tmp_path / "t.jinja"
    f.write_text(TEMPLATE.replace("[{{ m['role'] }}]", "<<{{ m.role }}>>"))
    res = invoke(
        ["data", "check", str(p), "--model", str(no_template_model), "--chat-template", str(f)]
    )
    assert "<<user>> What color is the sky?" in res.output


def test_chat_template_reaches_training_tokenization(tmp_path, no_template_model):
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.data.rows import load_examples
    from mlx_kto.data.tokenize import tokenize_examples
    from mlx_kto.model.load import load_base

    cfg = KTOConfig(model=str(no_template_model), chat_template=TEMPLATE).validate()
    _, tok, _, _ = load_base(cfg)
    rows, _ = tokenize_examples(load_examples(_write(tmp_path / "c.jsonl", _chat_rows())), tok)
    assert tok.decode(rows[0].prompt_ids).endswith("[assistant]")


def test_bad_chat_template_values(tmp_path):
    from mlx_kto.model.chat_template import read_chat_template

    with pytest.raises(UserError, match="neither a file nor a Jinja template"):
        read_chat_template("no-such-file.jinja")
    j = tmp_path / "tokenizer_config.json"
    j.write_text(json.dumps({"chat_template": TEMPLATE}))
    assert read_chat_template(str(j)) == TEMPLATE


# ---------------------------------------------------------------------------
# generate


def test_generate_help_shows_the_chat_default():
    res = invoke(["generate", "--help"])
    assert re.search(r"--chat / --no-chat[^\[]*\[default:\s+chat\]", res.output)
    for flag in ("--system-prompt", "--top-p", "--min-p", "--top-k", "--chat-template"):
        assert flag in res.output


def test_generate_stdin_system_prompt_and_speed_figures(tiny_llama):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    question = "What color is the sky?"
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": question}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True)
    res = invoke(
        ["generate", "--model", str(tiny_llama), "-p", "-", "--system-prompt", "Be kind.",
         "--max-tokens", "4", "--temp", "1.0", "--top-p", "0.9", "--min-p", "0.05",
         "--top-k", "20"],
        input=question,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"prompt: {len(expected)} tokens" in res.output
    assert re.search(r"generation: [1-4] tokens, [\d.]+ tokens/s", res.output)
    assert re.search(r"peak memory: [\d.]+ GB", res.output)


def test_top_k_1_is_greedy(tiny_llama):
    from mlx_kto.judge.generate import generate, prompt_ids

    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(tiny_llama))
    ids = prompt_ids(tok, "Tell me about the sea.")
    greedy, _ = generate(model, tok, ids, 8, temp=0.0)
    mx.random.seed(3)
    top1, stats = generate(model, tok, ids, 8, temp=1.0, top_k=1)
    assert top1 == greedy and stats.generation_tokens >= 1


def test_generate_without_template_notes_the_flag(no_template_model):
    res = invoke(["generate", "--model", str(no_template_model), "-p", "hi", "-m", "2"])
    assert res.exit_code == 0 and "--chat-template" in res.output
    res = CliRunner().invoke(
        cli, ["generate", "--model", str(no_template_model), "-p", "hi", "--system-prompt", "x"]
    )
    assert isinstance(res.exception, UserError) and "chat template" in str(res.exception)
