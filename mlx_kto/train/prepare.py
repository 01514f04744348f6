"""A run's rows: load (or take) the examples, tokenize each split as training does
(truncation, the KTO KL partners, the DPO pairs), and resolve `desirable_weight: auto` from
the class balance."""

from __future__ import annotations

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.columns import FieldMap
from mlx_kto.data.rows import load_splits
from mlx_kto.data.tokenize import (
    assign_kl_partners,
    auto_desirable_weight,
    balance_report,
    class_counts,
    tokenize_examples,
)
from mlx_kto.errors import UserError
from mlx_kto.train.dpo import check_pairs, is_paired


def prepare_data(cfg: KTOConfig, tokenizer, log=print, splits: dict | None = None):
    """Load (or take `splits`: {"train": [Example], "valid": ...}), tokenize and pair (KL
    partners) the train/valid splits; report balance. Returns (train rows, valid rows or
    None, desirable_weight)."""
    if splits is None:
        if not cfg.data:
            raise UserError("data: no data given (--data FILE_OR_FOLDER)")
        splits = load_splits(
            cfg.data, seed=cfg.seed, fields=FieldMap.from_config(cfg), split=cfg.data_split
        )
    out = {name: tokenize_split(cfg, name, splits[name], tokenizer, log)
           for name in ("train", "valid") if name in splits}  # fmt: skip
    n_d, n_u = class_counts(out["train"])
    dw = cfg.desirable_weight
    if dw == "auto":
        dw = auto_desirable_weight(n_d, n_u, cfg.undesirable_weight)
        log(f"desirable_weight: auto -> {dw:.3f}")
    for line in balance_report(n_d, n_u, float(dw), cfg.undesirable_weight):
        log(line)
    return out["train"], out.get("valid"), float(dw)


def tokenize_split(cfg: KTOConfig, name: str, examples, tokenizer, log=print):
    """Tokenize one split as training does (truncation; KL partners for kto; pairs split as
    TRL's DPO splits them for dpo/ipo); report what was cut."""
    rows, stats = tokenize_examples(
        examples, tokenizer, cfg.max_length, cfg.max_prompt_length, pairs=is_paired(cfg)
    )
    if stats.n_dropped_long_prompt:
        log(
            f"warning: {name}: dropped {stats.n_dropped_long_prompt} rows whose prompt alone "
            f"reaches max_length={cfg.max_length} (raise --max-length or set --max-prompt-length)"
        )
    if stats.n_truncated:
        log(f"{name}: truncated {stats.n_truncated} completions to max_length={cfg.max_length}")
    if stats.n_prompt_truncated:
        log(
            f"{name}: cut {stats.n_prompt_truncated} prompts to their last "
            f"max_prompt_length={cfg.max_prompt_length} tokens"
        )
    if stats.n_dropped_empty:
        log(f"warning: {name}: dropped {stats.n_dropped_empty} rows with an empty completion")
    if stats.n_boundary_merge:
        log(
            f"{name}: {stats.n_boundary_merge} rows: prompt tokens were not a prefix of "
            "prompt+completion tokens; split at the common prefix (as TRL does)"
        )
    min_rows = 2 if cfg.loss_type == "kto" else 1
    if len(rows) < min_rows:
        raise UserError(
            f"--data (data): {name} split has {len(rows)} usable rows; need at least {min_rows}"
        )
    if cfg.loss_type == "kto":
        assign_kl_partners(rows, seed=cfg.seed, max_length=cfg.max_length)
    if is_paired(cfg):
        check_pairs(rows, name, cfg.loss_type, log)  # unpaired data: one line naming the row
    return rows
