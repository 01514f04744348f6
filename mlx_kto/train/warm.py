"""Fill the reference log-prob cache up front (`mlx-kto cache warm`), as TRL computes its
reference log-probs before training: the later `train` then only reads them."""

from __future__ import annotations

import time
from dataclasses import replace

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import iterate_batches
from mlx_kto.errors import UserError
from mlx_kto.model.load import load_base, load_init_adapter, trainable_lora
from mlx_kto.reference.scorer import make_scorer
from mlx_kto.train.fast_paths import fast_paths
from mlx_kto.train.prepare import prepare_data

import mlx.core as mx


def warm_cache(cfg: KTOConfig, log=print) -> dict:
    """Fill the reference cache for cfg's train and valid splits; returns the scorer stats.
    `cfg` is not changed (the model loader sets the dtype on a copy)."""
    cfg = replace(cfg).validate()
    if cfg.no_ref_cache:
        raise UserError("--no-ref-cache: warming the cache needs the cache switched on")
    model, tokenizer, model_path, _ = load_base(cfg)
    frozen = None
    if cfg.init_adapter:
        load_init_adapter(model, cfg.init_adapter)
        frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
    train_rows, valid_rows, _ = prepare_data(cfg, tokenizer, log)
    scorer = make_scorer(cfg, model, frozen, model_path, log)
    if scorer.cache is None:
        raise UserError("--ref-cache: the reference cache could not be opened (see the warning)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with_kl = cfg.loss_type == "kto"
    t0 = time.perf_counter()
    for name, rows in (("train", train_rows), ("valid", valid_rows)):
        if not rows:
            continue
        with fast_paths(model):  # computed as training computes them
            for _, _, batch in iterate_batches(
                rows, cfg.batch_size, shuffle=False, pad_id=pad_id, with_kl=with_kl,
                min_size=2 if with_kl else 1, loop=False,
            ):  # fmt: skip
                scorer(batch)
        log(f"{name}: {len(rows)} rows scored ({scorer.hits} hits, {scorer.misses} misses so far)")
    stats = scorer.stats()
    log(
        f"cache warm: {stats['ref_misses']} sequences computed in {stats['ref_forwards']} "
        f"forwards, {stats['ref_hits']} already cached ({time.perf_counter() - t0:.1f}s)"
    )
    return stats
