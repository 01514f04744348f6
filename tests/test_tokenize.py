"""Tokenization, truncation, KL partners and class balance (mlx_kto.data.tokenize)."""

import json

from mlx_kto.data.rows import Example, load_examples
from mlx_kto.data.tokenize import (
    Row,
    TokenizeStats,
    assign_kl_partners,
    auto_desirable_weight,
    balance_report,
    class_counts,
    recommended_weight_range,
    tokenize_examples,
)
from mlx_kto.errors import UserError

import pytest

BOS, EOS = 1, 2
USER = {"role": "user", "content": "What color is the sky?"}
BLUE = {"role": "assistant", "content": "It is blue."}


@pytest.fixture(params=["mlx_wrapper", "transformers"])
def tok(request):
    """Both tokenizer kinds training may receive."""
    return request.getfixturevalue(
        "tokenizer" if request.param == "mlx_wrapper" else "hf_tokenizer"
    )


def render_ids(hf_tokenizer, messages, generation_prompt):
    """Reference ids: the chat template rendered to text, then encoded without extra specials."""
    text = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    return hf_tokenizer.encode(text, add_special_tokens=False)


class CharTokenizer:
    """Minimal fake: one id per character (offset 10), optional BOS, a chat template that
    returns a dict (like transformers 5) and records the kwargs it was given."""

    eos_token = "</s>"
    eos_token_id = EOS
    chat_template = "fake"

    def __init__(self, bos=True, drop_assistant=False):
        self.bos_token_id = BOS if bos else None
        self.drop_assistant = drop_assistant
        self.calls = []

    def encode(self, text):
        text = text.replace(self.eos_token, "\x02")
        ids = [EOS if c == "\x02" else 10 + ord(c) for c in text]
        return ([BOS] if self.bos_token_id else []) + ids

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False, **kw):
        self.calls.append(kw)
        parts = [
            f"<{m['role']}>{m['content']}"
            for m in messages
            if not (self.drop_assistant and m["role"] == "assistant")
        ]
        ids = self.encode("".join(parts) + ("<assistant>" if add_generation_prompt else ""))
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


# ---------------------------------------------------------------------------
# standard rows


def test_standard_bos_once_eos_appended(tok):
    rows, stats = tokenize_examples([Example("The sky is", " blue.", True, where="f:1")], tok)
    (r,) = rows
    assert r.prompt_ids == tok.encode("The sky is")
    assert r.tokens == tok.encode("The sky is blue.</s>")
    assert r.tokens[0] == BOS and r.tokens.count(BOS) == 1
    assert r.completion_ids[-1] == EOS and r.tokens.count(EOS) == 1
    assert tok.decode(r.completion_ids) == " blue.</s>"
    assert r.label is True and r.where == "f:1" and r.kl_completion_ids == []
    assert (stats.n_in, stats.n_kept, stats.n_boundary_merge) == (1, 1, 0)


def test_standard_eos_not_doubled(tok):
    (r,), _ = tokenize_examples([Example("The sky is", " blue.</s>", False)], tok)
    assert r.tokens == tok.encode("The sky is blue.</s>")
    assert r.tokens.count(EOS) == 1 and r.label is False


def test_standard_split_is_common_prefix_on_boundary_merge(tok):
    # "bl" + "ue." re-tokenizes as "Ġblue" + "." so the prompt's last tokens merge.
    prompt_alone = tok.encode("The sky is bl")
    (r,), stats = tokenize_examples([Example("The sky is bl", "ue.", True)], tok)
    full = tok.encode("The sky is blue.</s>")
    assert r.tokens == full
    assert len(r.prompt_ids) < len(prompt_alone)
    assert r.prompt_ids == prompt_alone[: len(r.prompt_ids)]
    assert full[len(r.prompt_ids)] != prompt_alone[len(r.prompt_ids)]
    assert stats.n_boundary_merge == 1


# ---------------------------------------------------------------------------
# conversational rows


def test_conversational_uses_chat_template_no_extra_eos(tok, hf_tokenizer):
    (r,), stats = tokenize_examples([Example([USER], [BLUE], True)], tok)
    assert r.prompt_ids == render_ids(hf_tokenizer, [USER], generation_prompt=True)
    assert r.tokens == render_ids(hf_tokenizer, [USER, BLUE], generation_prompt=False)
    assert tok.decode(r.prompt_ids) == "<s><|user|>What color is the sky?</s><|assistant|>"
    assert tok.decode(r.completion_ids) == "It is blue.</s>"
    assert r.tokens.count(BOS) == 1 and r.tokens[-2] != EOS  # template's EOS only
    assert stats.n_boundary_merge == 0


def test_chat_log_rows_tokenize_like_conversational(tmp_path, tok, hf_tokenizer):
    follow = {"role": "user", "content": "Thank you."}
    msgs = [USER, BLUE, follow, {"role": "assistant", "content": "Of course!"}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": msgs, "label": "up"}) + "\n")
    (r,), _ = tokenize_examples(load_examples(f), tok)
    assert r.prompt_ids == render_ids(hf_tokenizer, msgs[:-1], generation_prompt=True)
    assert r.tokens == render_ids(hf_tokenizer, msgs, generation_prompt=False)
    assert tok.decode(r.completion_ids) == "Of course!</s>"
    assert r.where == f"{f}:1"


def test_tools_and_template_kwargs_forwarded():
    fake = CharTokenizer()
    tools = [{"type": "function", "function": {"name": "f"}}]
    ex = Example([USER], [BLUE], True, tools=tools, chat_template_kwargs={"enable_thinking": False})
    (r,), _ = tokenize_examples([ex], fake)
    assert fake.calls == [{"tools": tools, "enable_thinking": False}] * 2
    # dict (BatchEncoding-like) return handled: completion is the assistant text
    assert r.completion_ids == fake.encode("<assistant>It is blue.")[1:][len("<assistant>") :]


def test_no_chat_template_is_user_error(tmp_path):
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from toy import build_tokenizer

    plain = build_tokenizer(tmp_path, chat_template=None)
    for t in (plain, TokenizerWrapper(plain)):
        with pytest.raises(
            UserError, match=r"^d\.jsonl:3: conversational rows .*need a chat template"
        ):
            tokenize_examples([Example([USER], [BLUE], True, where="d.jsonl:3")], t)
        (r,), _ = tokenize_examples([Example("a", " b", True)], t)  # standard rows still fine
        assert r.completion_ids[-1] == EOS


def test_chat_template_failure_names_row():
    class Broken(CharTokenizer):
        def apply_chat_template(self, messages, **kw):
            raise ValueError("Conversation roles must alternate\nmore detail")

    with pytest.raises(UserError, match=r"^d:4: the chat template failed .*alternate\)$"):
        tokenize_examples([Example([USER], [BLUE], True, where="d:4")], Broken())


def test_empty_completion_after_split_is_dropped():
    fake = CharTokenizer(drop_assistant=True)  # template renders no completion at all
    exs = [Example([USER], [BLUE], True), Example("p", " c", False)]
    rows, stats = tokenize_examples(exs, fake)
    assert len(rows) == 1 and rows[0].label is False
    assert (stats.n_in, stats.n_kept, stats.n_dropped_empty) == (2, 1, 1)


# ---------------------------------------------------------------------------
# truncation


def test_drop_when_prompt_reaches_max_length(tok):
    p = len(tok.encode("The sky is"))
    ex = Example("The sky is", " blue.", True)
    rows, stats = tokenize_examples([ex], tok, max_length=p)
    assert rows == [] and stats.n_dropped_long_prompt == 1 and stats.n_kept == 0
    (r,), stats = tokenize_examples([ex], tok, max_length=p + 1)
    assert len(r.completion_ids) == 1 and len(r.tokens) == p + 1 and stats.n_truncated == 1


def test_right_truncation(tok):
    ex = Example(
        "Please say hello.", " Hello! How are you today? I am fine, thank you very much.", 1
    )
    (full,), stats = tokenize_examples([ex], tok, max_length=None)
    assert stats.n_truncated == 0 and len(full.completion_ids) > 5
    limit = len(full.prompt_ids) + 5
    (r,), stats = tokenize_examples([ex], tok, max_length=limit)
    assert r.prompt_ids == full.prompt_ids
    assert r.completion_ids == full.completion_ids[:5]  # tail (EOS included) cut
    assert len(r.tokens) == limit and stats.n_truncated == 1
    (r,), stats = tokenize_examples([ex], tok, max_length=len(full.tokens))
    assert r.tokens == full.tokens and stats.n_truncated == 0


def test_max_prompt_length_keep_end_keeps_bos(tok):
    prompt = "Two plus two is four. Three plus five is eight. The answer is"
    ex = Example(prompt, " right.", True)
    (full,), _ = tokenize_examples([ex], tok, max_length=None)
    (r,), stats = tokenize_examples([ex], tok, max_length=None, max_prompt_length=4)
    assert r.prompt_ids == [BOS] + full.prompt_ids[-3:]
    assert r.completion_ids == full.completion_ids
    assert stats.n_prompt_truncated == 1
    # cut before the max_length check: this prompt would otherwise be dropped
    rows, stats = tokenize_examples([ex], tok, max_length=6, max_prompt_length=4)
    assert len(rows) == 1 and stats.n_dropped_long_prompt == 0
    assert rows[0].tokens == [BOS] + full.prompt_ids[-3:] + full.completion_ids[:2]
    # short prompts are left alone
    _, stats = tokenize_examples([ex], tok, max_length=None, max_prompt_length=len(full.prompt_ids))
    assert stats.n_prompt_truncated == 0


def test_keep_end_without_bos():
    fake = CharTokenizer(bos=False)
    (r,), _ = tokenize_examples([Example("abcdef", "g", True)], fake, max_prompt_length=3)
    assert r.prompt_ids == fake.encode("def")


def test_bad_lengths():
    with pytest.raises(UserError, match="max_length"):
        tokenize_examples([Example("a", "b", True)], CharTokenizer(), max_length=1)
    with pytest.raises(UserError, match="max_prompt_length"):
        tokenize_examples([Example("a", "b", True)], CharTokenizer(), max_prompt_length=0)


def test_stats_lines():
    s = TokenizeStats(n_in=10, n_kept=8, n_dropped_long_prompt=2, n_truncated=3)
    lines = s.lines()
    assert lines[0] == "tokenized 10 examples -> 8 rows"
    assert any(line.strip().startswith("2 dropped") for line in lines)
    assert not any("max_prompt_length" in line for line in lines)


# ---------------------------------------------------------------------------
# KL partners


def make_rows(prompts, completion_len=4):
    return [
        Row([BOS, 100 + p], [200 + i] * completion_len, i % 2 == 0, where=f"f:{i + 1}")
        for i, p in enumerate(prompts)
    ]


def partners(rows):
    return [r.kl_partner for r in rows]


def test_kl_partner_has_different_prompt_and_its_completion():
    rows = make_rows([i // 2 for i in range(40)])  # paired data: two rows per prompt
    assign_kl_partners(rows, seed=0)
    for i, r in enumerate(rows):
        j = r.kl_partner
        assert j != i and rows[j].prompt_ids != r.prompt_ids
        assert r.kl_completion_ids == rows[j].completion_ids
        assert r.kl_tokens == r.prompt_ids + rows[j].completion_ids


def test_kl_partners_spread_and_deterministic():
    rows = make_rows(list(range(100)))
    assign_kl_partners(rows, seed=7)
    first = partners(rows)
    assert sorted(first) == list(range(100))  # each completion lent exactly once
    assign_kl_partners(rows, seed=7)
    assert partners(rows) == first
    assign_kl_partners(rows, seed=8)
    assert partners(rows) != first


def test_kl_partner_truncated_to_max_length():
    rows = make_rows([0, 1, 2], completion_len=10)
    assign_kl_partners(rows, seed=0, max_length=6)
    for r in rows:
        assert len(r.kl_completion_ids) == 4 and len(r.kl_tokens) == 6
    assign_kl_partners(rows, seed=0, max_length=2)  # prompt fills it: still one token
    assert all(len(r.kl_completion_ids) == 1 for r in rows)
    assign_kl_partners(rows, seed=0, max_length=None)
    assert all(len(r.kl_completion_ids) == 10 for r in rows)


def test_kl_all_same_prompt_falls_back_to_other_row():
    rows = make_rows([0] * 6)
    assign_kl_partners(rows, seed=3)
    assert all(r.kl_partner != i for i, r in enumerate(rows))


def test_kl_single_distinct_prompt_gets_used_by_everyone():
    rows = make_rows([0] * 9 + [1])
    assign_kl_partners(rows, seed=1)
    assert partners(rows)[:9] == [9] * 9
    assert rows[9].kl_partner in range(9)


def test_kl_needs_two_rows():
    with pytest.raises(UserError, match=r"^f: KTO needs at least 2 rows .*\(got 1\)"):
        assign_kl_partners(make_rows([0]))
    with pytest.raises(UserError, match=r"^data/t\.json: KTO needs at least 2 rows"):
        assign_kl_partners([Row([BOS], [5], True, where="data/t.json[0]")])
    with pytest.raises(UserError, match="at least 2 rows"):
        assign_kl_partners([])


def test_kl_partners_on_tokenized_rows(tok):
    exs = [Example(f"Question {i}?", f" answer {i}", i % 3 == 0) for i in range(10)]
    rows, _ = tokenize_examples(exs, tok, max_length=12)
    assign_kl_partners(rows, seed=0, max_length=12)
    for r in rows:
        assert rows[r.kl_partner].prompt_ids != r.prompt_ids and len(r.kl_tokens) <= 12
        assert r.kl_tokens[0] == BOS and r.kl_tokens.count(BOS) == 1


# ---------------------------------------------------------------------------
# class balance


def test_class_counts():
    assert class_counts(make_rows(range(5))) == (3, 2)
    assert class_counts([Example("a", "b", True), Example("a", "c", True)]) == (2, 0)


def test_recommended_weight_range():
    lo, hi = recommended_weight_range(120, 380)
    assert lo == pytest.approx(380 / 120) and hi == pytest.approx(4 / 3 * 380 / 120)
    lo2, hi2 = recommended_weight_range(120, 380, undesirable_weight=2.0)
    assert (lo2, hi2) == pytest.approx((2 * lo, 2 * hi))
    with pytest.raises(ValueError):
        recommended_weight_range(0, 10)


def test_auto_desirable_weight_mid_range():
    for n_d, n_u, lam_u in [(120, 380, 1.0), (500, 100, 1.0), (30, 70, 0.5)]:
        w = auto_desirable_weight(n_d, n_u, lam_u)
        assert w * n_d / (lam_u * n_u) == pytest.approx(7 / 6)
        lo, hi = recommended_weight_range(n_d, n_u, lam_u)
        assert lo < w < hi
    assert auto_desirable_weight(0, 10) == 1.0 and auto_desirable_weight(10, 0) == 1.0


def test_balance_report_out_of_range():
    assert balance_report(120, 380, 1.0, 1.0) == [
        "class balance: 120 desirable / 380 undesirable (24% desirable)",
        "desirable_weight 1.0 puts λ_D·n_D/(λ_U·n_U) at 0.32, outside [1, 4/3]; "
        "recommended desirable_weight in [3.17, 4.22] (or set desirable_weight: auto)",
    ]


def test_balance_report_in_range():
    assert balance_report(100, 100, 1.0, 1.0) == [
        "class balance: 100 desirable / 100 undesirable (50% desirable)"
    ]
    w = auto_desirable_weight(120, 380)
    assert len(balance_report(120, 380, w, 1.0)) == 1
    lo, hi = recommended_weight_range(120, 380)
    assert len(balance_report(120, 380, lo, 1.0)) == 1  # ends are inside
    assert len(balance_report(120, 380, hi, 1.0)) == 1
    assert len(balance_report(120, 380, hi * 1.01, 1.0)) == 2


def test_balance_report_single_class():
    lines = balance_report(0, 50, 1.0, 1.0)
    assert lines[0] == "class balance: 0 desirable / 50 undesirable (0% desirable)"
    assert "only undesirable rows" in lines[1] and "only pushes one direction" in lines[1]
    assert "only desirable rows" in balance_report(50, 0, 1.0, 1.0)[1]


# ---------------------------------------------------------------------------
# DPO pairs: one split point per pair, as TRL 1.16's DPO


def _dpo_rule(hf, prompt: str, chosen: str, rejected: str):
    """dpo-spec's rule, with the transformers tokenizer as TRL calls it: encode the prompt and
    prompt + each side (+ EOS), split both at k = the shorter of the two common prefixes."""

    def ids(text):
        return list(hf(text=text)["input_ids"])

    def prefix(a, b):
        return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))

    p = ids(prompt)
    c, r = ids(prompt + chosen + hf.eos_token), ids(prompt + rejected + hf.eos_token)
    k = min(prefix(p, c), prefix(p, r))
    return p[:k], c[k:], r[k:]


MERGED_PAIRS = [
    ("Hello", " world", "world"),  # "Helloworld" re-tokenizes from the first letter
    ("Hello", "s", " world"),
    ("The answer is ", "yes", "no way"),  # the prompt's trailing space joins each reply
]


@pytest.mark.parametrize("name", ["qwen3", "llama3_1", "gemma3", "llama2"])
def test_dpo_pairs_split_once_as_trl_on_merged_boundaries(name):
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.data.rows import parse_row
    from mlx_kto.train.prepare import tokenize_split

    from assets_tokenizers import tokenizer_dir
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tokenizer_dir(name))
    hf = tok._tokenizer
    examples = []
    for i, (prompt, chosen, rejected) in enumerate(MERGED_PAIRS):
        examples += parse_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, f"m:{i}")[
            0
        ]
    dpo = tokenize_split(KTOConfig(loss_type="dpo", max_length=64), "train", examples, tok)
    kto, _ = tokenize_examples(examples, tok, 64, None)  # KTO: each row its own split
    moved = 0
    for i, (prompt, chosen, rejected) in enumerate(MERGED_PAIRS):
        c, r = [row for row in dpo if row.where == f"m:{i}"]
        assert c.label and not r.label
        want_prompt, want_c, want_r = _dpo_rule(hf, prompt, chosen, rejected)
        assert (c.prompt_ids, c.completion_ids) == (want_prompt, want_c)
        assert (r.prompt_ids, r.completion_ids) == (want_prompt, want_r)
        kc, kr = [row for row in kto if row.where == f"m:{i}"]
        moved += kc.completion_ids != c.completion_ids or kr.completion_ids != r.completion_ids
        assert kc.tokens == c.tokens and kr.tokens == r.tokens  # the same ids, split elsewhere
    # "Hello" + " world" / "world": the clean side is scored from "Hello" on under DPO.
    c = next(row for row in dpo if row.where == "m:0" and row.label)
    assert hf.convert_ids_to_tokens(c.completion_ids)[0] in ("Hello", "▁Hello")
    assert moved >= 2  # the per-pair split changed what is scored on merged pairs


def test_pairs_that_do_not_share_their_prompt_tokens_are_refused():
    from mlx_kto.data.pairs import find_pairs

    rows = [
        Row([BOS, 5], [7, EOS], True, where="f:1", paired=True),
        Row([BOS], [5, 8, EOS], False, where="f:1", paired=True),  # split apart
    ]
    with pytest.raises(UserError, match="f:1: the chosen and rejected replies of this pair"):
        find_pairs(rows)
