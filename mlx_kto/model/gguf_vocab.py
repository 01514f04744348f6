"""`tokenizers` pipelines for the vocabularies GGUF files store (`gguf_tokenizer.read_vocab`'s
spec in, a `tokenizers.Tokenizer` out). The pipelines are the ones the original Hugging Face
tokenizers use, as llama.cpp's runtime reproduces them (src/llama-vocab.cpp):

- byte-level BPE (`tokenizer.ggml.model = gpt2`): the pre-tokenizer regex named by
  `tokenizer.ggml.pre`, then the GPT-2 byte alphabet, then the file's merges;
- SentencePiece BPE (`llama`): "▁" for spaces and a leading "▁" (unless add_space_prefix is
  false), merges ranked by the merged piece's score (SentencePiece picks the best-scoring
  pair), unknown characters as <0xXX> byte tokens;
- Gemma's SentencePiece (architectures gemma*): spaces become "▁" without a leading one,
  split after each space, and the file order of the pieces ranks the merges (Gemma's scores
  do not follow its merge order), whitespace-only pieces stored as spaces respelled "▁".
Control tokens (type 3) and the bos / eos / unk / pad tokens are special added tokens, matched
whole in the text; user-defined ones (type 4) are matched whole too, but not special.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (LLAMA_TOKEN_TYPE_*)
SPACE = "\u2581"  # SentencePiece's visible space

# The original tokenizers' split regexes (their tokenizer.json / tiktoken patterns).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (  # o200k: Phi-4-mini
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> (split regex or None for GPT-2's own, digits split one by one first,
# whole words in the vocabulary taken without merges as llama.cpp's `ignore_merges`).
PRE = {
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "llama3": (_LLAMA3, False, True),
    "llama-v3": (_LLAMA3, False, True),
    "llama-bpe": (_LLAMA3, False, True),
    "qwen2": (_QWEN2, False, False),
    "deepseek-r1-qwen": (_QWEN2, False, False),
    "gpt-4o": (_GPT4O, False, False),
}
GEMMA_ARCHES = ("gemma", "gemma2", "gemma3")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a piece into two pieces
    of the vocabulary, ranked by the merged piece's score (best first), then the longer left
    and right parts, then vocabulary order. (Where a piece is listed twice, the later id
    and score count, as in a dict built in id order.)"""
    vocab = {t: i for i, t in enumerate(tokens)}
    score = dict(zip(tokens, scores))
    ranked = []
    for order, (piece, s) in enumerate(score.items()):
        found = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((vocab[left], vocab[right], left, right))
        for id_l, id_r, left, right in sorted(found):
            ranked.append((-s, -len(left), -len(right), order, id_l, id_r, left, right))
    ranked.sort(key=lambda r: r[:6])
    return [(r[6], r[7]) for r in ranked]


def _byte_level(spec: dict) -> Tokenizer:
    pre = spec["pre"] or "default"
    if pre not in PRE:
        raise ValueError(
            f"tokenizer.ggml.pre {pre!r}: no split rule for this byte-level vocabulary "
            f"(known: {', '.join(sorted(PRE))})"
        )
    if not spec["merges"]:
        raise ValueError("tokenizer.ggml.merges is missing (a byte-level BPE needs its merges)")
    regex, digits, ignore_merges = PRE[pre]
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    vocab = {}
    for i, t in enumerate(spec["tokens"]):  # tokens outside the byte alphabet: their bytes
        vocab[t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode())] = i
    merges = [tuple(m.split(" ", 1)) for m in spec["merges"]]
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if regex is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(spec: dict) -> Tokenizer:
    tokens, scores = spec["tokens"], spec["scores"]
    gemma = spec["arch"] in GEMMA_ARCHES
    if gemma:  # whitespace pieces stored as spaces; the file order ranks the merges
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
        scores = [-i for i in range(len(tokens))]
    elif scores is None:
        raise ValueError("tokenizer.ggml.scores is missing (a SentencePiece vocabulary needs them)")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = (
        [tuple(m.split(" ", 1)) for m in spec["merges"]]
        if spec["merges"]
        else spm_merges(tokens, scores)
    )
    unk = tokens[spec["unk_id"]] if spec["unk_id"] is not None else None
    tok = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        tok.normalizer = normalizers.Replace(" ", SPACE)
        tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        # SentencePiece's dummy prefix: a "▁" before every text (and after every special
        # token), even one that starts with a space, as llama.cpp and the original
        # tokenizer.json do (a Metaspace pre-tokenizer would not double a leading space).
        prefix = spec["add_space_prefix"] is not False
        tok.normalizer = normalizers.Sequence(
            ([normalizers.Prepend(SPACE)] if prefix else []) + [normalizers.Replace(" ", SPACE)]
        )
        if prefix:
            steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def add_bos_default(spec: dict) -> bool:
    """tokenizer.ggml.add_bos_token, or llama.cpp's default where a file has none:
    SentencePiece and Llama 3 vocabularies add BOS, other byte-level ones do not."""
    if spec["add_bos"] is not None:
        return bool(spec["add_bos"])
    return spec["model"] == "llama" or (spec["pre"] in ("llama3", "llama-v3", "llama-bpe"))


def build_tokenizer(spec: dict) -> Tokenizer:
    """The `tokenizers` pipeline of a GGUF vocabulary (see the module docstring), with its
    special tokens added and bos / eos added to every encoded text as the file says."""
    if spec["model"] == "gpt2":
        tok = _byte_level(spec)
    elif spec["model"] == "llama":
        tok = _sentencepiece(spec)
    else:
        raise ValueError(
            f"tokenizer.ggml.model {spec['model']!r} is not supported "
            "(supported: gpt2 = byte-level BPE, llama = SentencePiece)"
        )
    tokens, types = spec["tokens"], spec["types"] or []
    vocab = tok.get_vocab()
    special_ids = {spec[f"{n}_id"] for n in ("bos", "eos", "unk", "pad")} - {None}
    special_ids |= {i for i, t in enumerate(types) if t == CONTROL}
    special = [tokens[i] for i in sorted(special_ids) if tokens[i] in vocab]
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    spec["add_bos_flag"] = add_bos = add_bos_default(spec) and spec["bos_id"] is not None
    add_eos = bool(spec["add_eos"]) and spec["eos_id"] is not None
    bos = [(tokens[spec["bos_id"]], spec["bos_id"])] if add_bos else []
    eos = [(tokens[spec["eos_id"]], spec["eos_id"])] if add_eos else []
    single = " ".join([f"{b[0]}:0" for b in bos] + ["$A:0"] + [f"{e[0]}:0" for e in eos])
    pair = (
        single + " " + " ".join([f"{b[0]}:1" for b in bos] + ["$B:1"] + [f"{e[0]}:1" for e in eos])
    )
    tok.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=bos + eos)
    return tok
