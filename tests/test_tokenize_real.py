"""Tokenization with real tokenizers (Llama 3.1, Qwen3, Gemma 3, Mistral-7B v0.1's
SentencePiece) and their chat templates: our rows equal TRL 1.16's `_prepare_dataset`
split (re-derived below from the transformers tokenizer alone), BOS once, EOS handling,
and the prompt/completion boundary, on standard and conversational rows."""

import json

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.rows import Example
from mlx_kto.data.tokenize import tokenize_examples
from mlx_kto.model.load import load_base

import mlx.core as mx
import pytest
from assets_tokenizers import NAMES, real_model, real_models  # noqa: F401  (fixture)

STANDARD = [
    ("The sky is", " blue."),
    ("Q: What is 2+2?\nA:", " 4"),
    ("The answer is ", "yes, of course."),  # trailing space: the tokens merge at the boundary
    ("Translate to French: cat\n", "chat"),
]
USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}
ADDS_BOS = {"llama3_1": True, "qwen3": False, "gemma3": True, "llama2": True}
# What each family's template puts after the generation prompt for BLUE (TRL keeps it).
COMPLETION_TEXT = {
    "llama3_1": "It is blue.<|eot_id|>",
    "qwen3": "<think>\n\n</think>\n\nIt is blue.<|im_end|>\n",
    "gemma3": "It is blue.<end_of_turn>\n",
    "llama2": "It is blue.</s>",
}


@pytest.fixture(scope="module")
def loaded(real_models):  # noqa: F811
    """name -> (model, training tokenizer from our loader, its transformers tokenizer)."""
    cache = {}

    def get(name):
        if name not in cache:
            model, tok, _, _ = load_base(KTOConfig(model=str(real_models(name))))
            cache[name] = (model, tok, tok._tokenizer)
        return cache[name]

    return get


def trl_split(hf, ex: Example) -> tuple[list[int], list[int]]:
    """TRL 1.16 KTOTrainer._prepare_dataset + data_utils._tokenize for one row."""
    if ex.conversational:
        kw = {"tools": ex.tools, **(ex.chat_template_kwargs or {})}
        p = hf.apply_chat_template(
            ex.prompt, tokenize=True, return_dict=True, add_generation_prompt=True, **kw
        )["input_ids"]
        f = hf.apply_chat_template(
            ex.prompt + ex.completion, tokenize=True, return_dict=True, **kw
        )["input_ids"]
    else:
        c = ex.completion
        if not c.endswith(hf.eos_token):
            c += hf.eos_token
        p = hf(text=ex.prompt)["input_ids"]
        f = hf(text=ex.prompt + c)["input_ids"]
    k = 0
    while k < min(len(p), len(f)) and p[k] == f[k]:
        k += 1
    return list(p[:k]), list(f[k:])


def _ours(tok, examples):
    rows, stats = tokenize_examples(examples, tok, max_length=None)
    assert len(rows) == len(examples)
    return rows, stats


@pytest.mark.parametrize("name", NAMES)
def test_real_shape_model_loads(real_models, loaded, name):  # noqa: F811
    from mlx_lm.utils import load_model

    folder = real_models(name)
    cfg = json.loads((folder / "config.json").read_text())
    ours, tok, _ = loaded(name)
    theirs, _ = load_model(folder)  # mlx-lm's loader (mlx_lm.load without the tokenizer)
    ids = tok.encode("Hello world")
    for m in (ours, theirs):
        out = m(mx.array([ids]))
        assert out.shape == (1, len(ids), cfg["vocab_size"])
    assert mx.array_equal(ours(mx.array([ids])), theirs(mx.array([ids])))


@pytest.mark.parametrize("name", NAMES)
def test_standard_rows_match_trl(loaded, name):
    _, tok, hf = loaded(name)
    examples = [Example(p, c, True, where=f"d:{i}") for i, (p, c) in enumerate(STANDARD)]
    examples.append(Example("The sky is", " blue." + hf.eos_token, False, where="d:eos"))
    rows, stats = _ours(tok, examples)
    for ex, row in zip(examples, rows):
        assert (row.prompt_ids, row.completion_ids) == trl_split(hf, ex), ex.where
        ids = row.tokens
        if ADDS_BOS[name]:
            assert ids[0] == hf.bos_token_id and ids.count(hf.bos_token_id) == 1
        else:
            assert hf.bos_token_id is None or hf.bos_token_id not in ids
        assert ids[-1] == hf.eos_token_id and ids.count(hf.eos_token_id) == 1  # never doubled
    # The trailing-space prompt merges with its completion (TRL: the split is the common prefix).
    assert stats.n_boundary_merge >= 1
    blue = rows[0]
    # (SentencePiece decoders drop the "▁" that starts the decoded text)
    assert hf.decode(blue.completion_ids) in (" blue." + hf.eos_token, "blue." + hf.eos_token)


def test_sentencepiece_prefix_completion_is_cut_from_the_joined_text(loaded):
    """Mistral's "▁": encode(" blue.") alone starts with a lone "▁" piece that the joined
    text does not have; the completion must be the joined text's tail (as TRL does)."""
    _, tok, hf = loaded("llama2")
    (row,), _ = _ours(tok, [Example("The sky is", " blue.", True)])
    alone = hf.encode(" blue." + hf.eos_token, add_special_tokens=False)
    assert hf.convert_ids_to_tokens(alone)[0] == "▁"
    assert row.completion_ids == alone[1:]
    assert hf.convert_ids_to_tokens(row.completion_ids)[0] == "▁blue"


CONVERSATIONS = {
    "single": ([USER], [BLUE]),
    "multi": (
        [USER, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Why?"}],
        [{"role": "assistant", "content": "Rayleigh scattering."}],
    ),
    "system": ([{"role": "system", "content": "Be brief."}, USER], [BLUE]),
}


TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather at a place",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.mark.parametrize("name", NAMES)
def test_conversational_rows_match_trl(loaded, name):
    _, tok, hf = loaded(name)
    convs = dict(CONVERSATIONS)
    if name == "llama2":  # Mistral v0.1's template has no system role
        convs.pop("system")
    examples = [Example(p, c, True, where=k) for k, (p, c) in convs.items()]
    examples.append(Example([USER], [BLUE], False, where="tools", tools=[TOOL]))
    rows, stats = _ours(tok, examples)
    assert stats.n_boundary_merge == 0
    for ex, row in zip(examples, rows):
        assert (row.prompt_ids, row.completion_ids) == trl_split(hf, ex), ex.where
        if ADDS_BOS[name]:  # the template writes it; tokenizing the text adds none
            assert row.tokens.count(hf.bos_token_id) == 1 and row.tokens[0] == hf.bos_token_id
        # No EOS appended beyond what the template renders.
        assert row.completion_ids.count(hf.eos_token_id) == 1
    assert hf.decode(rows[0].completion_ids) == COMPLETION_TEXT[name]
    if name == "qwen3":  # the one template here that renders tools: they reach the prompt
        assert "get_weather" in hf.decode(rows[-1].prompt_ids)
    assert (
        hf.decode(rows[0].prompt_ids)
        .rstrip()
        .endswith(
            {
                "llama3_1": "<|start_header_id|>assistant<|end_header_id|>",
                "qwen3": "<|im_start|>assistant",
                "gemma3": "<start_of_turn>model",
                "llama2": "[/INST]",
            }[name]
        )
    )


def test_thinking_switch_is_the_templates_default_as_in_trl(loaded, tmp_path):
    """mlx-lm's wrapper passes enable_thinking=True to any tokenizer with <think> tokens;
    TRL passes nothing. A template whose thinking defaults to off must render the same
    prompt as in TRL (else the prompt ends in '<think>' and the boundary moves)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    _, tok, hf = loaded("qwen3")
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% if enable_thinking is defined and enable_thinking %}<think>\n{% endif %}{% endif %}"
    )
    from transformers import AutoTokenizer

    hf.save_pretrained(str(tmp_path))
    hf2 = AutoTokenizer.from_pretrained(str(tmp_path))
    hf2.chat_template = template
    wrapped = TokenizerWrapper(hf2)
    assert wrapped.has_thinking  # the wrapper would switch thinking on
    ex = Example([USER], [BLUE], True, where="d:1")
    (row,), stats = _ours(wrapped, [ex])
    assert (row.prompt_ids, row.completion_ids) == trl_split(hf2, ex)
    assert stats.n_boundary_merge == 0
    assert hf2.decode(row.completion_ids) == "It is blue.<|im_end|>\n"
    # An explicit switch in the row still reaches the template.
    ex_on = Example([USER], [BLUE], True, chat_template_kwargs={"enable_thinking": True})
    (row_on,), _ = _ours(wrapped, [ex_on])
    assert hf2.decode(row_on.prompt_ids).endswith("<|im_start|>assistant\n")
    assert (row_on.prompt_ids, row_on.completion_ids) == trl_split(hf2, ex_on)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_prompt_is_the_training_prompt(loaded, name):
    """`generate`, the demo, the probes and `compare` render prompts with
    `judge.sample.prompt_ids` (through `chat_prompt_ids`): the same ids training uses as the
    prompt of a conversational row."""
    from mlx_kto.data.tokenize import chat_prompt_ids
    from mlx_kto.judge.sample import prompt_ids

    _, tok, _ = loaded(name)
    (row,), _ = _ours(tok, [Example([USER], [BLUE], True)])
    assert chat_prompt_ids(tok, [USER]) == row.prompt_ids
    assert prompt_ids(tok, USER["content"]) == row.prompt_ids
    assert prompt_ids(tok, [USER]) == row.prompt_ids


def test_generate_command_uses_the_chat_prompt(tiny_llama, tokenizer, monkeypatch):
    """The ids that reach mlx-lm's generator are the chat prompt (as training renders it),
    and with --no-chat the raw text's."""
    from mlx_kto.cli.app import cli
    from mlx_kto.data.tokenize import chat_prompt_ids

    import mlx_lm
    from click.testing import CliRunner

    seen = []
    real = mlx_lm.stream_generate

    def recording(model, tok, prompt, **kw):
        seen.append(list(prompt))
        yield from real(model, tok, prompt, **kw)

    monkeypatch.setattr(mlx_lm, "stream_generate", recording)
    args = ["generate", "--model", str(tiny_llama), "--prompt", "Hello", "--max-tokens", "3"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    chat_ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Hello"}])
    assert seen == [chat_ids] and f"prompt: {len(chat_ids)} tokens" in res.output
    res = CliRunner().invoke(cli, [*args, "--no-chat"])
    assert res.exit_code == 0, res.output
    assert seen[1] == list(tokenizer.encode("Hello")) != chat_ids
