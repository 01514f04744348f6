"""Evaluation on held-out rows: the loss and TRL's metrics in eval mode (no dropout), through
the same reference scorer and fast paths as training."""

from __future__ import annotations

from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import iterate_batches
from mlx_kto.model.logprobs import sequence_logps
from mlx_kto.reference.scorer import ReferenceScorer
from mlx_kto.train.dpo import is_paired, iterate_pair_batches, paired_loss
from mlx_kto.train.fast_paths import run_fast_paths
from mlx_kto.train.loss import kto_loss, merge_metrics, metrics_to_floats
from mlx_kto.train.schedule import min_batch
from mlx_kto.train.stepfns import loss_kwargs, policy_kl_logps

import mlx.nn as nn

# What the log shows of an evaluation (the metrics.jsonl record has every key).
EVAL_KEYS = (
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracy",
    "rewards/accuracies",  # dpo/ipo (TRL DPOTrainer's name)
)
FINAL_EVAL_KEYS = ("loss", "rewards/margins", "rewards/accuracy", "rewards/accuracies", "kl")


def evaluate(
    model: nn.Module,
    rows,
    cfg: KTOConfig,
    scorer: ReferenceScorer,
    desirable_weight: float,
    max_batches: int = -1,
    pad_id: int = 0,
) -> dict:
    """KTO loss, rewards, margins, kl and reward accuracy over `rows` (eval mode); for
    dpo/ipo the paired loss and TRL DPOTrainer's metrics over every pair of `rows`."""
    with run_fast_paths(model, cfg):
        return _evaluate(model, rows, cfg, scorer, desirable_weight, max_batches, pad_id)


def _evaluate(model, rows, cfg, scorer, desirable_weight, max_batches, pad_id) -> dict:
    with_kl = cfg.loss_type == "kto"
    was_training = model.training
    model.eval()
    total = None
    if is_paired(cfg):
        batches = iterate_pair_batches(rows, cfg.batch_size, cfg.pad_multiple, pad_id)
    else:
        batches = (b for _, _, b in iterate_batches(
            rows,
            max(cfg.batch_size, min_batch(cfg)),  # a 1-row micro-batch has no KL estimate
            seed=cfg.seed,
            shuffle=False,
            pad_multiple=cfg.pad_multiple,
            pad_id=pad_id,
            with_kl=with_kl,
            min_size=min_batch(cfg),
            loop=False,
        ))  # fmt: skip
    for i, batch in enumerate(batches):
        if max_batches > 0 and i >= max_batches:
            break
        ref, ref_kl = scorer(batch)
        pol = sequence_logps(model, batch.tokens, batch.mask, head_start=batch.head_start)
        if is_paired(cfg):
            _, metrics = paired_loss(pol, ref, batch.mask, cfg)
        else:
            kl_pol = policy_kl_logps(model, batch)
            _, metrics = kto_loss(
                pol, ref, kl_pol, ref_kl, batch.labels, **loss_kwargs(cfg, desirable_weight)
            )
        m = metrics_to_floats(metrics)
        total = m if total is None else merge_metrics(total, m)
    model.train(was_training)
    return total or {}


def format_eval(prefix: str, ev: dict, keys=EVAL_KEYS) -> str:
    """`eval @ 30: loss 0.6931 kl 0.0000 ...`: the keys of `ev` among `keys`, in that order."""
    return prefix + " ".join(f"{k} {ev[k]:.4f}" for k in keys if k in ev)
