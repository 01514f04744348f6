"""Diversity metrics, entropy and the sampler, on hand-made inputs with known values."""

import math

from mlx_kto.judge.diversity import (
    distinct_n,
    diversity_summary,
    mean_self_bleu,
    self_bleu,
    sentence_bleu,
    words,
)

import mlx.core as mx
import mlx.nn as nn
import pytest


def test_words_split_punctuation_and_lowercase():
    assert words("Hello, World! It's 42.") == [
        "hello",
        ",",
        "world",
        "!",
        "it",
        "'",
        "s",
        "42",
        ".",
    ]
    assert words("   ") == []


def test_distinct_n_known_values():
    # "a b a b": unigrams a,b,a,b -> 2 unique / 4; bigrams ab,ba,ab -> 2 / 3
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)
    # pooled over texts: "x y" + "x z": unigrams x,y,x,z -> 3/4; bigrams xy, xz -> 2/2
    assert distinct_n(["x y", "x z"], 1) == 0.75
    assert distinct_n(["x y", "x z"], 2) == 1.0
    # the same reply ten times: 3 unique bigrams out of 30
    assert distinct_n(["it is blue ."] * 10, 2) == pytest.approx(3 / 30)
    # no n-gram at all: no diversity
    assert distinct_n(["a", "b"], 2) == 0.0 and distinct_n([], 1) == 0.0


def test_bleu_identical_is_one_including_short_replies():
    s = words("the cat sat on the mat")
    assert sentence_bleu(s, [s]) == pytest.approx(1.0)
    # effective order: a 2-word reply has no 3/4-grams and still scores 1 against itself
    assert sentence_bleu(["yes", "."], [["yes", "."]]) == pytest.approx(1.0)


def test_bleu_worked_example():
    hyp = words("the cat sat on the mat")
    ref = words("the cat is on the mat")
    # clipped precisions: 1-grams 5/6, 2-grams 3/5, 3-grams 1/4 ("on the mat"),
    # 4-grams 0/3 -> smoothed 0.1/3; equal lengths: BP = 1
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert sentence_bleu(hyp, [ref]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.2541, abs=1e-4)


def test_bleu_brevity_penalty_and_clipping():
    # "the cat" vs a 6-word reference: orders 1..2, both precisions 1, BP = exp(1 - 6/2)
    assert sentence_bleu(["the", "cat"], [words("the cat sat on the mat")]) == pytest.approx(
        math.exp(-2)
    )
    # "the the the the" vs "the cat": "the" clipped to 1 match of 4; higher orders no match
    expected = (1 / 4 * (0.1 / 3) * (0.1 / 2) * (0.1 / 1)) ** 0.25  # c=4 > r=2: BP = 1
    assert sentence_bleu(["the"] * 4, [["the", "cat"]]) == pytest.approx(expected)
    # no unigram match: 0
    assert sentence_bleu(["x", "y"], [["a", "b"]]) == 0.0


def test_bleu_closest_reference_length_prefers_shorter_on_tie():
    hyp = ["a", "b", "c", "d", "e"]
    refs = [["a", "b", "c"], ["a", "b", "c", "d", "e", "f", "g"]]
    # |5-3| == |5-7|: r = 3 < c, so BP = 1. Max count per n-gram over refs: 1-grams 5/5,
    # 2-grams 4/4, 3-grams 3/3, 4-grams 2/2 (the 7-word ref holds them all)
    assert sentence_bleu(hyp, refs) == pytest.approx(1.0)
    # with the 7-word reference alone: BP = exp(1 - 7/5)
    assert sentence_bleu(hyp, refs[1:]) == pytest.approx(math.exp(1 - 7 / 5))


def test_bleu_empty():
    assert sentence_bleu([], [[]]) == 1.0
    assert sentence_bleu([], [["a"]]) == 0.0
    with pytest.raises(ValueError):
        sentence_bleu(["a"], [])


def test_self_bleu():
    assert self_bleu(["it is blue .", "it is blue ."]) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0
    assert self_bleu(["only one"]) is None
    # three texts: the mean of each against the other two
    texts = ["the cat sat on the mat", "the cat is on the mat", "dogs run"]
    h = [words(t) for t in texts]
    expected = (
        sentence_bleu(h[0], [h[1], h[2]])
        + sentence_bleu(h[1], [h[0], h[2]])
        + sentence_bleu(h[2], [h[0], h[1]])
    ) / 3
    assert self_bleu(texts) == pytest.approx(expected)
    assert sentence_bleu(h[2], [h[0], h[1]]) == 0.0
    # averaged per prompt, prompts with a single sample skipped
    assert mean_self_bleu([["a b", "a b"], ["x y", "z w"], ["solo"]]) == pytest.approx(0.5)


def test_diversity_summary():
    d = diversity_summary(
        [["a b", "a b"], ["a c", "d e"]], entropy_sum=3.0, entropy_count=4, reply_tokens=[2, 4]
    )
    assert d["distinct_1"] == pytest.approx(5 / 8)  # a,b,a,b,a,c,d,e: a b c d e
    assert d["distinct_2"] == pytest.approx(3 / 4)  # ab, ab, ac, de
    assert d["self_bleu"] == pytest.approx(0.5)
    assert d["entropy"] == 0.75 and d["length"] == 3.0


# ---------------------------------------------------------------------------
# entropy of the model's own samples, against a hand-computed distribution


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution is always `probs` (vocab 3, token 2 = stop)."""

    def __init__(self, probs):
        super().__init__()
        self.logits = mx.log(mx.array(probs))

    def make_cache(self):
        return []

    def __call__(self, tokens, cache=None):
        B, T = tokens.shape
        return mx.broadcast_to(self.logits, (B, T, self.logits.shape[0]))


class StubTokenizer:
    eos_token_id = 2
    eos_token_ids = {2}

    def decode(self, ids):
        return " ".join(f"t{i}" for i in ids)


def test_token_entropy_matches_hand_computed():
    from mlx_kto.judge.sample import token_entropy

    # H(1/2, 1/4, 1/4) = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    h = token_entropy(mx.log(mx.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])))
    assert h.tolist() == pytest.approx([1.5 * math.log(2), math.log(3)], rel=1e-6)


def test_sampler_entropy_and_lengths():
    from mlx_kto.judge.sample import sample_replies, summarize

    model = FixedLogits([0.5, 0.25, 0.25])
    out = sample_replies(model, StubTokenizer(), [[0, 1], [1]], n=5, max_tokens=6, seed=3)
    assert [len(per) for per in out] == [5, 5]
    for s in (s for per in out for s in per):
        assert 2 not in s.tokens and len(s.tokens) <= 6
        # one measured position per drawn token, plus the stop token when it was drawn
        assert s.positions == len(s.tokens) + (len(s.tokens) < 6)
        assert s.entropy_sum == pytest.approx(1.5 * math.log(2) * s.positions, rel=1e-5)
    assert summarize(out)["entropy"] == pytest.approx(1.5 * math.log(2), rel=1e-5)
    # greedy never draws the stop token (token 0 is the most likely): full length
    greedy = sample_replies(model, StubTokenizer(), [[0]], n=2, max_tokens=4, temp=0.0)
    assert [s.tokens for s in greedy[0]] == [[0, 0, 0, 0]] * 2
    assert summarize(greedy)["length"] == 4.0


def test_sampler_is_seeded_and_restores_mode(tiny_llama, tokenizer):
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.judge.sample import prompt_ids, sample_replies
    from mlx_kto.model.load import load_base

    model, _, _, _ = load_base(KTOConfig(model=str(tiny_llama)))
    model.train()
    ids = [prompt_ids(tokenizer, p) for p in ("What color is the sky?", "Hello")]
    a = sample_replies(model, tokenizer, ids, n=3, max_tokens=8, seed=1)
    b = sample_replies(model, tokenizer, ids, n=3, max_tokens=8, seed=1)
    c = sample_replies(model, tokenizer, ids, n=3, max_tokens=8, seed=2)
    assert [[s.tokens for s in p] for p in a] == [[s.tokens for s in p] for p in b]
    assert [[s.tokens for s in p] for p in a] != [[s.tokens for s in p] for p in c]
    assert model.training  # restored
    assert all(s.text == tokenizer.decode(s.tokens) for p in a for s in p)


def test_left_padded_batches_sample_what_per_length_batches_sample(tiny_llama, tokenizer):
    """Greedy: prompts of three lengths in one left-padded batch give the replies and the
    entropies of one batch per length (the padding is masked, positions start at 0)."""
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.judge.sample import prompt_ids, sample_replies
    from mlx_kto.model.load import load_base

    model, _, _, _ = load_base(KTOConfig(model=str(tiny_llama)))
    prompts = ["What color is the sky?", "Hello", "Tell me a long story about the sea."]
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    assert len({len(i) for i in ids}) == 3
    kw = dict(n=2, max_tokens=6, temp=0.0)
    apart = sample_replies(model, tokenizer, ids, **kw)
    together = sample_replies(model, tokenizer, ids, **kw, left_pad=True)
    assert [[s.tokens for s in p] for p in together] == [[s.tokens for s in p] for p in apart]
    for p, q in zip(together, apart):
        for s, t in zip(p, q):
            assert s.entropy_sum == pytest.approx(t.entropy_sum, rel=1e-3)


def test_one_prompt_helper_for_demo_judge_and_generate(tokenizer):
    """The chat prompt is rendered as training renders prompts; raw text is encoded as is;
    a system prompt or a message list needs a template."""
    from mlx_kto.data.tokenize import chat_prompt_ids
    from mlx_kto.errors import UserError
    from mlx_kto.judge import generate
    from mlx_kto.judge.sample import prompt_ids

    user = {"role": "user", "content": "Hi there"}
    assert generate.prompt_ids is prompt_ids
    assert prompt_ids(tokenizer, "Hi there") == chat_prompt_ids(tokenizer, [user])
    assert prompt_ids(tokenizer, [user]) == chat_prompt_ids(tokenizer, [user])
    system = {"role": "system", "content": "Be brief."}
    assert prompt_ids(tokenizer, "Hi there", "Be brief.") == chat_prompt_ids(
        tokenizer, [system, user]
    )
    assert prompt_ids(tokenizer, "Hi there", raw=True) == list(tokenizer.encode("Hi there"))
    assert prompt_ids(tokenizer, "Hi there", chat=False) == list(tokenizer.encode("Hi there"))

    class Plain:
        chat_template = None

        def encode(self, text):
            return [len(text)]

    notes = []
    assert prompt_ids(Plain(), "abc", log=notes.append) == [3] and "--chat-template" in notes[0]
    with pytest.raises(UserError, match="rows.jsonl:3: a chat prompt"):
        prompt_ids(Plain(), [user], where="rows.jsonl:3")
    with pytest.raises(UserError, match="system-prompt"):
        prompt_ids(Plain(), "abc", "Be brief.")


def test_demo_samples_with_the_judges_sampler(tiny_llama, tokenizer):
    """`demo.sample.sample_completions` is the judge's sampler: same seed, same replies."""
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.demo.sample import sample_completions
    from mlx_kto.judge.sample import prompt_ids, sample_replies
    from mlx_kto.model.load import load_base

    model, _, _, _ = load_base(KTOConfig(model=str(tiny_llama)))
    prompts = ["What color is the sky?", "Hello"]
    texts = sample_completions(model, tokenizer, prompts, n=3, max_tokens=6, seed=4, max_rows=64)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    samples = sample_replies(model, tokenizer, ids, n=3, max_tokens=6, temp=1.0, seed=4)
    assert texts == [[s.text for s in per] for per in samples]
