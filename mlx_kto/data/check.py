"""`mlx-kto data check`: what a feedback source becomes before training.

Per split: the detected format (standard strings or conversational message lists, and
the file type), how many rows each input shape became (a pair -> 2 rows), the class
balance, and with a tokenizer: one example rendered through the chat template with the
prompt/completion boundary marked, token lengths, and what `max_length` /
`max_prompt_length` cut or drop."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mlx_kto.data.feedback import drop_retracted
from mlx_kto.data.load import is_saved_dataset, source_splits
from mlx_kto.data.rows import Example, _read_rows, examples_from_rows, find_split_files, parse_row
from mlx_kto.data.tokenize import balance_report, encode_example, tokenize_examples
from mlx_kto.errors import UserError

BOUNDARY = "<<<COMPLETION>>>"  # printed where the rated completion starts

SHAPES = {
    "unpaired": "unpaired (prompt/completion/label)",
    "messages": "chat log (messages/label)",
    "paired": "paired (prompt/chosen/rejected)",
    "paired_implicit": "paired, implicit prompt (chosen/rejected)",
}


def row_shape(row: Any) -> str:
    """The SHAPES key of a raw row (as data.parse_row reads it)."""
    if isinstance(row, dict):
        if "chosen" in row or "rejected" in row:
            return "paired" if "prompt" in row else "paired_implicit"
        if "messages" in row:
            return "messages"
    return "unpaired"


def raw_splits(data: str, split: str | None = None) -> dict[str, tuple[str, str, list]]:
    """{split: (source kind, source, raw (row, where) pairs)} of a file, folder, save_to_disk
    folder or hub id, read the way data.load_splits reads them."""
    raw = source_splits(data, split)
    if raw is not None:
        kind = (
            "save_to_disk folder"
            if Path(data).is_dir() and is_saved_dataset(Path(data))
            else ("Hugging Face dataset")
        )
        return {name: (kind, data, rows) for name, rows in raw.items()}
    path = Path(data)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    files = {"train": path} if path.is_file() else find_split_files(path)
    if "train" not in files:
        raise UserError(f"{path}: no train.jsonl (or train.json) in this folder")
    return {
        name: (f.suffix.lstrip(".") + " file", str(f), _read_rows(f)) for name, f in files.items()
    }


def shape_counts(rows: list) -> tuple[Counter, Counter]:
    """(input rows per shape, unpaired rows produced per shape); validates every row."""
    n_in, n_out = Counter(), Counter()
    for row, where in rows:
        examples, _ = parse_row(row, where)
        shape = row_shape(row)
        n_in[shape] += 1
        n_out[shape] += len(examples)
    return n_in, n_out


def render_example(ex: Example, tokenizer) -> tuple[str, int, int]:
    """(text with BOUNDARY at the prompt/completion split, prompt tokens, completion tokens),
    untruncated, exactly as training tokenizes the row."""
    prompt_ids, completion_ids, _ = encode_example(ex, tokenizer)
    text = tokenizer.decode(prompt_ids) + BOUNDARY + tokenizer.decode(completion_ids)
    return text, len(prompt_ids), len(completion_ids)


def _median(xs: list[int]) -> int:
    return sorted(xs)[len(xs) // 2] if xs else 0


def truncation_lines(
    examples: list[Example], tokenizer, max_length: int, max_prompt_length: int | None
) -> list[str]:
    """Token lengths before truncation and what max_length / max_prompt_length do to them."""
    full, _ = tokenize_examples(examples, tokenizer, None, None)
    if not full:
        return ["tokens: no usable rows (every completion is empty after tokenization)"]
    p = [len(r.prompt_ids) for r in full]
    c = [len(r.completion_ids) for r in full]
    t = [a + b for a, b in zip(p, c)]
    out = [
        f"tokens before truncation: prompt median {_median(p)} max {max(p)}; completion median "
        f"{_median(c)} max {max(c)}; total median {_median(t)} max {max(t)}"
    ]
    rows, st = tokenize_examples(examples, tokenizer, max_length, max_prompt_length)
    kept = sum(len(r.tokens) for r in rows)
    limits = f"max_length {max_length}" + (
        f", max_prompt_length {max_prompt_length}" if max_prompt_length else ""
    )
    effects = []
    if max_prompt_length:
        effects.append(
            f"{st.n_prompt_truncated} prompts cut to their last {max_prompt_length} tokens"
        )
    effects.append(f"{st.n_truncated} completions cut")
    effects.append(f"{st.n_dropped_long_prompt} rows dropped (prompt alone reaches max_length)")
    if st.n_dropped_empty:
        effects.append(f"{st.n_dropped_empty} rows dropped (empty completion)")
    pct = 100.0 * kept / max(sum(t), 1)
    out.append(f"with {limits}: " + ", ".join(effects))
    out.append(f"  {len(rows)} of {len(full)} rows kept, {kept} of {sum(t)} tokens ({pct:.1f}%)")
    return out


def data_check_lines(
    data: str,
    tokenizer=None,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    split: str | None = None,
    seed: int = 0,
    fields=None,
) -> list[str]:
    """The report `mlx-kto data check` prints (see module docstring). `fields`: a
    columns.FieldMap (--label-field, ...), applied before anything is counted."""
    lines: list[str] = []
    for name, (kind, source, rows) in raw_splits(str(data), split).items():
        rows = drop_retracted(rows)
        if fields is not None:
            rows = [(fields.apply(row, where), where) for row, where in rows]
        n_in, n_out = shape_counts(rows)
        examples = examples_from_rows(rows, source, seed)
        conv = examples[0].conversational
        fmt = (
            "conversational (message lists, rendered with the chat template)"
            if conv
            else "standard (strings: prompt + completion + EOS)"
        )
        lines.append(f"{name}: {len(examples)} rows from {len(rows)} input rows ({kind})")
        lines.append(f"  format: {fmt}")
        shapes = "; ".join(f"{n_in[s]} {SHAPES[s]} -> {n_out[s]} rows" for s in SHAPES if n_in[s])
        lines.append(f"  input shapes: {shapes}")
        n_d = sum(e.label for e in examples)
        lines += [f"  {x}" for x in balance_report(n_d, len(examples) - n_d, 1.0, 1.0)]
        if tokenizer is None:
            continue
        lines += [
            f"  {x}" for x in truncation_lines(examples, tokenizer, max_length, max_prompt_length)
        ]
        text, n_p, n_c = render_example(examples[0], tokenizer)
        label = "desirable" if examples[0].label else "undesirable"
        lines.append(
            f"  example ({examples[0].where}, {label}; {n_p} prompt + {n_c} completion tokens, "
            f"{BOUNDARY} marks where the scored completion starts):"
        )
        lines += [f"    {x}" for x in text.splitlines() or [""]]
    return lines
