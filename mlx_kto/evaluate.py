"""Score a trained adapter on labelled feedback: KTO loss, rewards, margins, accuracy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlx_kto.config import KTOConfig
from mlx_kto.errors import UserError


def evaluate_adapter(cfg: KTOConfig, adapter_path: str | Path, split: str = "valid") -> dict:
    """Evaluate `adapter_path` on `split` of cfg.data (falls back to the only split of a file).

    The reference is the base model (adapter off), as in training from scratch;
    reward accuracy = share of rows whose reward sign matches the label."""
    from mlx_kto.model import load_base, load_init_adapter
    from mlx_kto.reference import make_scorer
    from mlx_kto.train import prepare_data
    from mlx_kto.trainer import evaluate

    import mlx.core as mx

    cfg.validate()
    model, tokenizer, model_path, _ = load_base(cfg)
    load_init_adapter(model, adapter_path)
    model.eval()
    mx.eval(model.parameters())
    train_rows, valid_rows, dw = prepare_data(cfg, tokenizer, log=lambda *_: None)
    rows = {"train": train_rows, "valid": valid_rows}.get(split)
    if rows is None:
        if split == "valid" and valid_rows is None:
            rows = train_rows
        else:
            raise UserError(f"split: '{split}' not found in {cfg.data}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # The reference is the base model, so the adapter stays out of the cache fingerprint.
    ref_cfg = dataclasses.replace(cfg, init_adapter=None)
    scorer = make_scorer(ref_cfg, model, None, model_path, log=lambda *_: None)
    out = evaluate(model, rows, cfg, scorer, dw, cfg.eval_batches, pad_id)
    out["rows"] = len(rows)
    return out
