"""Examples -> token rows, as TRL 1.16 `KTOTrainer._prepare_dataset` does (kto-spec 2.1-2.2).

- standard rows: `tokenizer.eos_token` appended to the completion unless present;
  prompt_ids = encode(prompt), full = encode(prompt + completion) (BOS once, if the
  tokenizer adds one).
- conversational rows: prompt_ids = chat template of the prompt with the generation
  prompt; full = chat template of prompt + completion; no extra EOS. The template is
  the transformers tokenizer's, called as TRL calls it (no kwargs added).
- prompt and completion are never tokenized apart: SentencePiece tokenizers (Llama 2,
  Mistral) put a "▁" before the first piece of a text, so encode(completion) would
  start with a token that encode(prompt + completion) does not have.
- split at k = common prefix length of prompt_ids and full: prompt = prompt_ids[:k],
  completion = full[k:] (k < len(prompt_ids) means the boundary tokens merged).
- the two sides of a pair for DPO / IPO (`pairs=True`), as TRL 1.16's DPO: one split point
  for both, the shorter of their two common prefixes, k = min(k_chosen, k_rejected), so both
  completions are scored after the same prompt tokens. Prompt "Hello", chosen " world",
  rejected "world" on Qwen3's tokenizer: full ids [Hello, Ġworld, EOS] and [H, elloworld,
  EOS], k = min(1, 0) = 0: the chosen side scores [Hello, Ġworld, EOS] (split alone it would
  score [Ġworld, EOS]). KTO's unpaired rows keep their own split (TRL's KTO unpairs first).
- truncation: optional legacy `max_prompt_length` (keep_end, BOS kept); rows whose
  prompt alone is >= max_length are dropped; completions are right-truncated so that
  prompt + completion <= max_length (TRL truncates `ids[:max_length]` in the collator).

KL partners are fixed per row (DESIGN.md): a seeded random other row with a different
prompt lends its completion, so the KL sequence is (own prompt, partner's completion).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mlx_kto.data.rows import Example
from mlx_kto.errors import UserError

# TRL's imbalance rule: lambda_D * n_D / (lambda_U * n_U) in [1, 4/3] (paper Eq. 8).
BALANCE_RANGE = (1.0, 4.0 / 3.0)
AUTO_RATIO = 7.0 / 6.0  # the middle of BALANCE_RANGE


@dataclass
class Row:
    """One tokenized example; `kl_completion_ids` is filled by `assign_kl_partners`."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_completion_ids: list[int] = field(default_factory=list)  # partner's, already truncated
    where: str = ""
    kl_partner: int = -1  # index (in the list given to assign_kl_partners) of the KL partner
    paired: bool = False  # one side of a paired data row (Example.paired)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def kl_tokens(self) -> list[int]:
        return self.prompt_ids + self.kl_completion_ids


@dataclass
class TokenizeStats:
    n_in: int = 0  # examples given
    n_kept: int = 0  # rows returned
    n_dropped_long_prompt: int = 0  # prompt alone >= max_length
    n_truncated: int = 0  # completion right-truncated to fit max_length
    n_prompt_truncated: int = 0  # prompt cut to max_prompt_length (keep_end)
    n_boundary_merge: int = 0  # rows where prompt ids were not a prefix of the full ids
    n_dropped_empty: int = 0  # completion tokenized to nothing after the split

    def lines(self) -> list[str]:
        """Human-readable summary (only the counts that are non-zero besides kept)."""
        out = [f"tokenized {self.n_in} examples -> {self.n_kept} rows"]
        notes = [
            (self.n_dropped_long_prompt, "dropped: prompt alone reaches max_length"),
            (self.n_dropped_empty, "dropped: empty completion after tokenization"),
            (self.n_prompt_truncated, "prompts cut to max_prompt_length (kept the end)"),
            (self.n_truncated, "completions right-truncated to max_length"),
            (self.n_boundary_merge, "rows whose prompt tokens merged with the completion"),
        ]
        out += [f"  {n} {what}" for n, what in notes if n]
        return out


# ---------------------------------------------------------------------------
# Tokenizer access (mlx-lm TokenizerWrapper or a transformers tokenizer)


def _as_ids(out: Any) -> list[int]:
    """Token ids from what encode/apply_chat_template returned: a list, a
    BatchEncoding/dict (transformers 5 defaults to return_dict=True), or an array."""
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if out and isinstance(out[0], (list, tuple)):  # batched output for a single conversation
        out = list(out[0])
    return [int(t) for t in out]


def has_chat_template(tokenizer) -> bool:
    has = getattr(tokenizer, "has_chat_template", None)
    if isinstance(has, bool):
        return has
    return getattr(tokenizer, "chat_template", None) is not None


def _template_tokenizer(tokenizer):
    """The tokenizer whose chat template TRL would call: the transformers tokenizer under
    an mlx-lm TokenizerWrapper, whose own apply_chat_template adds a thinking switch
    (`enable_thinking=<has think tokens>`) that changes templates defaulting to off.
    The wrapper itself only when it renders a template the inner tokenizer lacks."""
    inner = getattr(tokenizer, "_tokenizer", None)
    if inner is not None and getattr(inner, "chat_template", None) is not None:
        return inner
    return tokenizer


def _chat_ids(tokenizer, messages: list[dict], ex: Example, generation_prompt: bool) -> list[int]:
    kwargs = dict(ex.chat_template_kwargs or {})
    if ex.tools is not None:
        kwargs["tools"] = ex.tools
    kwargs.update(tokenize=True, add_generation_prompt=generation_prompt)
    try:
        out = _template_tokenizer(tokenizer).apply_chat_template(messages, **kwargs)
    except Exception as e:  # jinja errors, unknown kwargs: report the row, one line
        msg = (str(e).strip().splitlines() or [""])[0]
        raise UserError(
            f"{ex.where}: the chat template failed on this row ({type(e).__name__}: {msg})"
        ) from None
    return _as_ids(out)


def chat_prompt_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """A conversation rendered as training renders prompts (chat template with the
    generation prompt, called as TRL calls it), for sampling from the same context."""
    out = _template_tokenizer(tokenizer).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, **template_kwargs
    )
    return _as_ids(out)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


# A long completion is tokenized from a prefix of its text: the first
# CHARS_PER_TOKEN * (max_length + SAFETY_TOKENS) characters, cut at whitespace, and
# grown 4x until it yields max_length + SAFETY_TOKENS completion tokens. Tokenizers
# only change tokens near the cut, so the kept first <= max_length tokens are those of
# the whole text (a 20 MB completion cut to 64 tokens: ms instead of a minute and GBs).
CHARS_PER_TOKEN = 16
SAFETY_TOKENS = 64


def _whitespace_cut(text: str, cut: int) -> int:
    """`cut`, moved back to just after a whitespace in its last 10% if there is one."""
    lo = cut - cut // 10
    for i in range(cut, lo, -1):
        if text[i - 1].isspace():
            return i
    return cut


def encode_example(
    ex: Example, tokenizer, max_length: int | None = None
) -> tuple[list[int], list[int], bool]:
    """(prompt_ids, completion_ids, boundary_merged) for one example, untruncated, or, for
    a string completion and `max_length`, with at least the first max_length +
    SAFETY_TOKENS completion tokens (what truncation keeps is the same either way)."""
    prompt_ids, full = encode_full(ex, tokenizer, max_length)
    k = _common_prefix_len(prompt_ids, full)
    return prompt_ids[:k], full[k:], k < len(prompt_ids)


def encode_full(ex: Example, tokenizer, max_length: int | None = None) -> tuple[list, list]:
    """(prompt ids, prompt + completion ids) of one example, before the split (see
    encode_example for the long-completion shortcut)."""
    if ex.conversational:
        prompt_ids = _chat_ids(tokenizer, ex.prompt, ex, generation_prompt=True)
        full = _chat_ids(tokenizer, ex.prompt + ex.completion, ex, generation_prompt=False)
        return prompt_ids, full
    completion = ex.completion
    eos = getattr(tokenizer, "eos_token", None)
    if eos and not completion.endswith(eos):
        completion = completion + eos
    prompt_ids = _as_ids(tokenizer.encode(ex.prompt))
    if max_length is not None:
        need = max_length + SAFETY_TOKENS
        cut = CHARS_PER_TOKEN * need
        while cut < len(ex.completion):
            part = ex.completion[: _whitespace_cut(ex.completion, cut)]
            ids = _as_ids(tokenizer.encode(ex.prompt + part))
            if len(ids) - _common_prefix_len(prompt_ids, ids) >= need:
                return prompt_ids, ids
            cut *= 4
    return prompt_ids, _as_ids(tokenizer.encode(ex.prompt + completion))


def split_points(examples: list[Example], encoded: list[tuple[list, list]], pairs: bool) -> list:
    """Where each example's ids split into prompt and completion: its own common prefix of
    prompt and full ids; with `pairs`, the shorter of the two for both sides of a paired
    row (the two Examples of one prompt/chosen/rejected row share `where`)."""
    k = [_common_prefix_len(p, f) for p, f in encoded]
    if pairs:
        sides: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            if getattr(ex, "paired", False):
                sides.setdefault(ex.where, []).append(i)
        for idx in sides.values():
            if len(idx) == 2:
                k[idx[0]] = k[idx[1]] = min(k[idx[0]], k[idx[1]])
    return k


def _keep_end(prompt_ids: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    """Legacy TRL `truncation_mode="keep_end"`: keep the last tokens, and the BOS."""
    if bos_id is not None and prompt_ids and prompt_ids[0] == bos_id:
        tail = (
            prompt_ids[len(prompt_ids) - (max_prompt_length - 1) :] if max_prompt_length > 1 else []
        )
        return [bos_id] + tail
    return prompt_ids[-max_prompt_length:]


def tokenize_examples(
    examples: list[Example],
    tokenizer,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    pairs: bool = False,
) -> tuple[list[Row], TokenizeStats]:
    """Tokenize, split and truncate `examples` (see module docstring). Returns the kept
    rows (input order) and counts of what was dropped or cut. `pairs`: split both sides of
    a paired row at one point, as TRL's DPO does (for the paired losses)."""
    if max_length is not None and max_length < 2:
        raise UserError(f"max_length must be at least 2 (got {max_length})")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"max_prompt_length must be at least 1 (got {max_prompt_length})")
    if any(ex.conversational for ex in examples) and not has_chat_template(tokenizer):
        first = next(ex for ex in examples if ex.conversational)
        raise UserError(
            f"{first.where}: conversational rows (message lists) need a chat template, and this "
            "tokenizer has none; pass --chat-template FILE_OR_STRING (or chat_template: in the "
            "YAML), use a chat model's tokenizer, or give prompt/completion as strings"
        )
    bos_id = getattr(tokenizer, "bos_token_id", None)
    stats = TokenizeStats(n_in=len(examples))
    rows: list[Row] = []
    encoded = [encode_full(ex, tokenizer, max_length) for ex in examples]
    for ex, (prompt_ids, full), k in zip(examples, encoded, split_points(examples, encoded, pairs)):
        stats.n_boundary_merge += k < len(prompt_ids)  # the boundary tokens merged
        prompt_ids, completion_ids = prompt_ids[:k], full[k:]
        if not completion_ids:
            stats.n_dropped_empty += 1
            continue
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = _keep_end(prompt_ids, max_prompt_length, bos_id)
            stats.n_prompt_truncated += 1
        if max_length is not None:
            if len(prompt_ids) >= max_length:
                stats.n_dropped_long_prompt += 1
                continue
            room = max_length - len(prompt_ids)
            if len(completion_ids) > room:
                completion_ids = completion_ids[:room]
                stats.n_truncated += 1
        rows.append(
            Row(
                prompt_ids,
                completion_ids,
                bool(ex.label),
                where=ex.where,
                paired=getattr(ex, "paired", False),
            )
        )
    stats.n_kept = len(rows)
    return rows, stats


# ---------------------------------------------------------------------------
# KL partners


def assign_kl_partners(rows: list[Row], seed: int = 0, max_length: int | None = 1024) -> None:
    """Give every row a fixed KL partner j (in place): `kl_completion_ids` =
    rows[j].completion_ids cut so that len(prompt_ids_i) + len(kl) <= max_length
    (at least one token). The KL sequence is (prompt_i, completion_j), the paper's
    mismatched pair z' = (x_i, y_j); TRL takes j = i-1 within a batch, we take a seeded
    random j with a different prompt, so batches can be reshuffled every epoch.

    Partners come from one seeded random cycle (each row lends its completion exactly
    once, nobody to itself); where the cycle pairs two rows with the same prompt, j is
    redrawn uniformly among rows with another prompt. If all prompts are equal, the
    cycle alone is used (any j != i). Deterministic given `seed` and the row list."""
    n = len(rows)
    if n < 2:
        # "data/train.jsonl:3" or "data/train.json[3]" -> the file
        src = re.sub(r"(:\d+|\[\d+\])$", "", rows[0].where) if rows and rows[0].where else ""
        src = src or "the dataset"
        raise UserError(
            f"{src}: KTO needs at least 2 rows to pair each completion with another "
            f"row's prompt for the KL term (got {n})"
        )
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    partner = [0] * n
    for k in range(n):
        partner[order[k]] = order[k - 1]  # one n-cycle: no fixed points

    keys = [tuple(r.prompt_ids) for r in rows]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    if len(groups) > 1:
        # Lay groups out contiguously so "uniform among rows outside my group" is one draw.
        layout: list[int] = []
        start: dict[tuple, int] = {}
        for key, members in groups.items():
            start[key] = len(layout)
            layout.extend(members)
        for i in range(n):
            if keys[partner[i]] == keys[i]:
                size, s = len(groups[keys[i]]), start[keys[i]]
                r = rng.randrange(n - size)
                partner[i] = layout[r if r < s else r + size]

    for i, row in enumerate(rows):
        j = partner[i]
        kl = rows[j].completion_ids
        if max_length is not None:
            kl = kl[: max(1, max_length - len(row.prompt_ids))]
        row.kl_completion_ids = list(kl)
        row.kl_partner = j


# ---------------------------------------------------------------------------
# Class balance


def class_counts(rows) -> tuple[int, int]:
    """(n_desirable, n_undesirable) of anything with a boolean `.label`."""
    n_d = sum(1 for r in rows if r.label)
    return n_d, len(rows) - n_d


def recommended_weight_range(
    n_desirable: int, n_undesirable: int, undesirable_weight: float = 1.0
) -> tuple[float, float]:
    """The desirable_weight range that puts λ_D·n_D / (λ_U·n_U) in [1, 4/3]
    (KTO paper Eq. 8; TRL's imbalance warning, which uses 1.33):
        [λ_U·n_U/n_D, (4/3)·λ_U·n_U/n_D].
    Needs both classes (with one absent no weight can balance them)."""
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError("recommended_weight_range needs at least one row of each class")
    lo = undesirable_weight * n_undesirable / n_desirable
    return lo * BALANCE_RANGE[0], lo * BALANCE_RANGE[1]


def auto_desirable_weight(
    n_desirable: int, n_undesirable: int, undesirable_weight: float = 1.0
) -> float:
    """`desirable_weight: auto`: λ_D = (7/6)·λ_U·n_U/n_D, i.e. the ratio
    λ_D·n_D / (λ_U·n_U) = 7/6, the middle of the recommended [1, 4/3]. With one class
    absent the weight balances nothing, so 1.0."""
    if n_desirable <= 0 or n_undesirable <= 0:
        return 1.0
    return AUTO_RATIO * undesirable_weight * n_undesirable / n_desirable


def _num(x: float) -> str:
    s = f"{x:.4g}"
    return s if any(c in s for c in ".en") else s + ".0"


def balance_report(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> list[str]:
    """Lines to print about class balance: the counts, plus a recommendation when
    λ_D·n_D / (λ_U·n_U) is outside [1, 4/3], or a note when one class is absent."""
    n = n_desirable + n_undesirable
    if n == 0:
        return ["class balance: no rows"]
    pct = 100.0 * n_desirable / n
    lines = [
        f"class balance: {n_desirable} desirable / {n_undesirable} undesirable "
        f"({pct:.0f}% desirable)"
    ]
    if n_desirable == 0 or n_undesirable == 0:
        only, other = (
            ("desirable", "undesirable") if n_undesirable == 0 else ("undesirable", "desirable")
        )
        lines.append(
            f"only {only} rows: the KTO loss still works but only pushes one direction "
            f"(no {other} examples to push away from); consider a conservative learning rate"
        )
        return lines
    if undesirable_weight <= 0:
        return lines
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    eps = 1e-9
    if not (BALANCE_RANGE[0] - eps <= ratio <= BALANCE_RANGE[1] + eps):
        lo, hi = recommended_weight_range(n_desirable, n_undesirable, undesirable_weight)
        lines.append(
            f"desirable_weight {_num(desirable_weight)} puts λ_D·n_D/(λ_U·n_U) at {ratio:.2f}, "
            f"outside [1, 4/3]; recommended desirable_weight in [{lo:.2f}, {hi:.2f}] "
            "(or set desirable_weight: auto)"
        )
    return lines
