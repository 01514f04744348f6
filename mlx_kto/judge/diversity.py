"""Diversity of a model's replies: distinct-n, self-BLEU, and the summary of a sample set.

All text metrics work on the same word tokens (`words`: lower-cased words and single
punctuation marks), so they do not depend on the model's tokenizer and two models with
different vocabularies compare on equal terms. Entropy and reply length come from the
sampler (`judge.sample`), in the model's own tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

_WORD = re.compile(r"\w+|[^\w\s]")
BLEU_ORDER = 4  # BLEU-4, as in Papineni et al. 2002 and self-BLEU (Zhu et al. 2018)
SMOOTH_EPSILON = 0.1  # Chen & Cherry 2014 smoothing 1 (nltk's method1 default)


def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of word characters, and each punctuation mark alone."""
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function"):

        distinct-n = |{unique n-grams over all texts}| / (total n-grams over all texts)

    1.0 = no n-gram repeats anywhere; near 0 = the same phrases over and over. A set with
    no n-gram at all (every text shorter than n words) has no diversity: 0.0."""
    total, unique = 0, set()
    for text in texts:
        grams = ngrams(words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def sentence_bleu(
    hypothesis: Sequence[str], references: Sequence[Sequence[str]], max_order: int = BLEU_ORDER
) -> float:
    """Sentence BLEU of a token list against reference token lists (Papineni et al. 2002):

        p_n  = sum_g min(c_hyp(g), max_r c_r(g)) / sum_g c_hyp(g)   (clipped n-gram precision)
        BP   = 1 if c > r else exp(1 - r / c)   (c = hypothesis length, r = the reference
               length closest to c, the shorter one on a tie)
        BLEU = BP * exp(sum_{n=1..N} (1/N) log p_n)

    with N = min(max_order, c) (the "effective order" of sentence-level BLEU, as in
    sacrebleu: a 3-word reply has no 4-grams, so it is scored on orders 1..3 and an
    identical short reply scores 1), and a zero clipped count at an order replaced by
    epsilon = 0.1 (Chen & Cherry 2014, smoothing 1). No unigram match at all gives 0.
    An empty hypothesis scores 1 against an empty reference (identical) and 0 otherwise."""
    c = len(hypothesis)
    if not references:
        raise ValueError("sentence_bleu needs at least one reference")
    if c == 0:
        return 1.0 if any(len(r) == 0 for r in references) else 0.0
    order = min(max_order, c)
    log_p = 0.0
    for n in range(1, order + 1):
        hyp = Counter(ngrams(hypothesis, n))
        best: Counter = Counter()
        for ref in references:
            for g, k in Counter(ngrams(ref, n)).items():
                best[g] = max(best[g], k)
        matches = sum(min(k, best[g]) for g, k in hyp.items())
        if matches == 0:
            if n == 1:
                return 0.0
            matches = SMOOTH_EPSILON
        log_p += math.log(matches / sum(hyp.values())) / order
    r = min((len(ref) for ref in references), key=lambda L: (abs(L - c), L))
    bp = 1.0 if c > r else math.exp(1.0 - r / c)
    return bp * math.exp(log_p)


def self_bleu(texts: Sequence[str], max_order: int = BLEU_ORDER) -> float | None:
    """Self-BLEU (Zhu et al. 2018, Texygen): the mean over texts of the BLEU of each text
    against all the others as references. 1.0 = every reply repeats the others; lower =
    more varied. None for fewer than 2 texts (nothing to compare)."""
    toks = [words(t) for t in texts]
    if len(toks) < 2:
        return None
    scores = [sentence_bleu(h, toks[:i] + toks[i + 1 :], max_order) for i, h in enumerate(toks)]
    return sum(scores) / len(scores)


def mean_self_bleu(samples_per_prompt: Sequence[Sequence[str]]) -> float | None:
    """Self-BLEU within each prompt's samples, averaged over prompts (how alike the answers
    to one question are, which is what mode collapse makes them)."""
    vals = [v for s in samples_per_prompt if (v := self_bleu(s)) is not None]
    return sum(vals) / len(vals) if vals else None


def diversity_summary(
    samples_per_prompt: Sequence[Sequence[str]],
    entropy_sum: float | None = None,
    entropy_count: int = 0,
    reply_tokens: Sequence[int] | None = None,
) -> dict:
    """The diversity figures of one model's samples (a list of replies per prompt):
    distinct_1, distinct_2 (over all replies), self_bleu (within prompts), entropy (mean
    per-token entropy in nats over the sampled positions, when the sampler measured it)
    and length (mean reply length in model tokens, when given)."""
    flat = [t for s in samples_per_prompt for t in s]
    out = {
        "distinct_1": distinct_n(flat, 1),
        "distinct_2": distinct_n(flat, 2),
        "self_bleu": mean_self_bleu(samples_per_prompt),
    }
    if entropy_sum is not None:
        out["entropy"] = entropy_sum / entropy_count if entropy_count else 0.0
    if reply_tokens is not None:
        out["length"] = sum(reply_tokens) / len(reply_tokens) if reply_tokens else 0.0
    return out
