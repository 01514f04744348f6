"""The KTO objective and its metrics, matching TRL 1.16.0 `KTOTrainer` (kto-spec.md 2.4, 2.5, 2.9)."""

from __future__ import annotations

import mlx.core as mx

LOSS_TYPES = ("kto", "apo_zero_unpaired")

# Metrics that are means over one side's rows (weighted by that side's count when merging).
_SIDE_KEYS = {
    "chosen": ("rewards/chosen", "logps/chosen"),
    "rejected": ("rewards/rejected", "logps/rejected"),
}


def kto_loss(
    policy_logps: mx.array,
    reference_logps: mx.array,
    kl_policy_logps: mx.array | None,
    kl_reference_logps: mx.array | None,
    labels: mx.array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    kl_reference_point: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """KTO loss of one micro-batch (paper Eq. 7, Ethayarajh et al. 2024; TRL 1.16.0 `_compute_loss`).

        r_i  = policy_logps_i - reference_logps_i                      (sequence log-ratio)
        z    = max(0, mean_j(kl_policy_logps_j - kl_reference_logps_j))  (no gradient)
        kto:               L_i = λ_D (1 - σ(β (r_i - z)))   if labels_i (desirable)
                           L_i = λ_U (1 - σ(β (z - r_i)))   otherwise
        apo_zero_unpaired: L_i = λ_D (1 - σ(β r_i))  |  λ_U σ(β r_i)        (z = 0)
        loss = (1/B) Σ_i L_i          (divided by the row count B, not by Σλ)

    All inputs are [B] (labels bool or 0/1). The KL term uses every row of the micro-batch; the
    reference and KL inputs get no gradient (`stop_gradient`). `1 - σ(x)` is computed as `σ(-x)`
    (same value, no cancellation in float32). KL inputs may be None for `apo_zero_unpaired`.
    `kl_reference_point`, when given, is z itself (a scalar already clamped at 0, e.g. taken over
    every micro-batch of an optimizer step and every rank, `mlx_kto.train.step`); the KL log-prob
    inputs are then ignored and may be None.

    Returns (loss, metrics): mx scalars, free of data-dependent Python control flow so the whole
    function can run under `mx.compile` / `mx.grad`. Side means use sum / max(count, 1), so an
    absent side reads 0 here; `metrics_to_floats` drops those entries (TRL logs nothing for them).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}"
        )
    policy = policy_logps.astype(mx.float32)  # [B]
    ratio = policy - mx.stop_gradient(reference_logps.astype(mx.float32))  # [B]
    chosen = labels.astype(mx.bool_)  # [B]

    if loss_type == "kto":
        if kl_reference_point is not None:
            kl = mx.stop_gradient(kl_reference_point.astype(mx.float32))  # []
        elif kl_policy_logps is None or kl_reference_logps is None:
            raise ValueError("loss_type='kto' needs kl_policy_logps and kl_reference_logps")
        else:
            kl_diff = kl_policy_logps.astype(mx.float32) - kl_reference_logps.astype(mx.float32)
            kl = mx.stop_gradient(mx.maximum(kl_diff.mean(), 0.0))  # []
        chosen_losses = mx.sigmoid(-beta * (ratio - kl))  # 1 - σ(β(r - z))
        rejected_losses = mx.sigmoid(-beta * (kl - ratio))  # 1 - σ(β(z - r))
    else:
        kl = mx.array(0.0, dtype=mx.float32)
        chosen_losses = mx.sigmoid(-beta * ratio)  # 1 - σ(β r)
        rejected_losses = mx.sigmoid(beta * ratio)  # σ(β r)

    losses = mx.where(
        chosen, desirable_weight * chosen_losses, undesirable_weight * rejected_losses
    )  # [B]
    loss = losses.mean()

    # Metrics (no gradient); TRL: rewards = β·r, logps = policy sequence log-probs.
    c = chosen.astype(mx.float32)  # [B]
    u = 1.0 - c
    n_c, n_u = c.sum(), u.sum()
    rewards = mx.stop_gradient(beta * ratio)  # [B]
    logps = mx.stop_gradient(policy)  # [B]
    rewards_c = (rewards * c).sum() / mx.maximum(n_c, 1.0)
    rewards_u = (rewards * u).sum() / mx.maximum(n_u, 1.0)
    correct = mx.where(chosen, rewards > 0, rewards < 0).astype(mx.float32)  # [B]
    metrics = {
        "loss": mx.stop_gradient(loss),
        "kl": kl,
        "rewards/chosen": rewards_c,
        "rewards/rejected": rewards_u,
        "rewards/margins": rewards_c - rewards_u,
        "rewards/accuracy": correct.mean(),
        "logps/chosen": (logps * c).sum() / mx.maximum(n_c, 1.0),
        "logps/rejected": (logps * u).sum() / mx.maximum(n_u, 1.0),
        "count/chosen": n_c,
        "count/rejected": n_u,
    }
    return loss, metrics


def _drop_absent(out: dict[str, float]) -> dict[str, float]:
    """Remove the entries of a side with no rows, and the margin unless both sides have rows."""
    present = {side: out.get(f"count/{side}", 0.0) > 0 for side in _SIDE_KEYS}
    for side, keys in _SIDE_KEYS.items():
        if not present[side]:
            for k in keys:
                out.pop(k, None)
    if not all(present.values()):
        out.pop("rewards/margins", None)
    return out


def metrics_to_floats(metrics: dict) -> dict[str, float]:
    """Host side: mx scalars -> Python floats, dropping the side-specific entries of an absent
    side (`rewards/chosen`, `logps/chosen` when count/chosen == 0, likewise rejected) and
    `rewards/margins` unless both sides are present (TRL logs no fake zeros). Metrics without
    counts are converted as they are."""
    out = {k: float(v.item() if isinstance(v, mx.array) else v) for k, v in metrics.items()}
    if "count/chosen" not in out and "count/rejected" not in out:
        return out
    return _drop_absent(out)


def merge_metrics(a: dict, b: dict) -> dict:
    """Combine the metrics of two micro-batches (host side, floats or mx scalars), count-weighted:

        count/*                            summed
        <key>/chosen, <key>/rejected       means weighted by that side's count
        rewards/margins                    merged rewards/chosen - merged rewards/rejected
        everything else (loss, kl, rewards/accuracy, ...)   weighted by rows (count/chosen + count/rejected)

    A side's entries missing from one dict (dropped because it had no rows) weigh 0. Without
    counts in either dict, the two are weighted equally. `merge_metrics({}, m)` returns m's floats,
    so an accumulator can start empty. Absent sides are dropped from the result.
    """
    a = metrics_to_floats(a)
    b = metrics_to_floats(b)
    if not a or not b:
        return dict(a or b)
    has_counts = any(k.startswith("count/") for k in (*a, *b))
    counts = {
        side: (a.get(f"count/{side}", 0.0), b.get(f"count/{side}", 0.0)) for side in _SIDE_KEYS
    }
    if has_counts:
        rows = (
            counts["chosen"][0] + counts["rejected"][0],
            counts["chosen"][1] + counts["rejected"][1],
        )
    else:
        rows = (1.0, 1.0)

    def mean(key: str, wa: float, wb: float) -> float | None:
        wa = wa if key in a else 0.0
        wb = wb if key in b else 0.0
        if wa + wb <= 0:
            return None
        return (wa * a.get(key, 0.0) + wb * b.get(key, 0.0)) / (wa + wb)

    out: dict[str, float] = {}
    for key in dict.fromkeys((*a, *b)):  # union, first-seen order
        if key.startswith("count/"):
            out[key] = a.get(key, 0.0) + b.get(key, 0.0)
        elif key == "rewards/margins":
            continue
        else:
            side = key.rsplit("/", 1)[-1] if "/" in key else None
            weights = counts[side] if side in counts and has_counts else rows
            value = mean(key, *weights)
            if value is not None:
                out[key] = value
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return _drop_absent(out) if has_counts else out


# ---------------------------------------------------------------------------
# DPO on the same stack (paired rows): the baseline KTO is compared against.

PAIRED_LOSS_TYPES = ("dpo", "ipo")


def dpo_loss(
    chosen_logps: mx.array,
    rejected_logps: mx.array,
    ref_chosen_logps: mx.array,
    ref_rejected_logps: mx.array,
    beta: float = 0.1,
    loss_type: str = "dpo",
    chosen_tokens: mx.array | None = None,
    rejected_tokens: mx.array | None = None,
) -> tuple[mx.array, dict]:
    """DPO loss of n pairs (Rafailov et al. 2023, Eq. 7; TRL 1.16.0 `DPOTrainer._compute_loss`).

        h_i   = (pc_i - rc_i) - (pr_i - rr_i)                  (chosen minus rejected log-ratio)
        dpo (TRL "sigmoid"):  L_i = -log σ(β h_i)
        ipo (Azar et al. 2023, Eq. 17; TRL normalises each side by its completion tokens):
                              L_i = ((pc_i - rc_i)/n_c - (pr_i - rr_i)/n_r - 1/(2β))^2
        loss  = (1/n) Σ_i L_i

    All inputs are [n]; the reference log-probs get no gradient. `-log σ(x)` is computed as
    `logaddexp(0, -x)` (no overflow for large |x|). Metrics follow TRL's names:
    rewards/chosen = mean β(pc - rc), rewards/rejected = mean β(pr - rr), rewards/accuracies =
    mean[β(pc - rc) > β(pr - rr)], rewards/margins, logps/chosen, logps/rejected; plus
    count/chosen and count/rejected (= n) so `merge_metrics` weighs micro-batches correctly.
    """
    if loss_type not in PAIRED_LOSS_TYPES:
        raise ValueError(
            f"unknown paired loss_type {loss_type!r}; expected one of {', '.join(PAIRED_LOSS_TYPES)}"
        )
    pc = chosen_logps.astype(mx.float32)  # [n]
    pr = rejected_logps.astype(mx.float32)  # [n]
    chosen_ratio = pc - mx.stop_gradient(ref_chosen_logps.astype(mx.float32))  # [n]
    rejected_ratio = pr - mx.stop_gradient(ref_rejected_logps.astype(mx.float32))  # [n]
    if loss_type == "dpo":
        losses = mx.logaddexp(mx.zeros_like(pc), -beta * (chosen_ratio - rejected_ratio))  # [n]
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_tokens and rejected_tokens")
        n_c = mx.maximum(chosen_tokens.astype(mx.float32), 1.0)
        n_r = mx.maximum(rejected_tokens.astype(mx.float32), 1.0)
        losses = (chosen_ratio / n_c - rejected_ratio / n_r - 1.0 / (2.0 * beta)) ** 2  # [n]
    loss = losses.mean()

    rewards_c = mx.stop_gradient(beta * chosen_ratio)  # [n]
    rewards_r = mx.stop_gradient(beta * rejected_ratio)  # [n]
    n = mx.array(float(pc.size), dtype=mx.float32)
    metrics = {
        "loss": mx.stop_gradient(loss),
        "rewards/chosen": rewards_c.mean(),
        "rewards/rejected": rewards_r.mean(),
        "rewards/accuracies": (rewards_c > rewards_r).astype(mx.float32).mean(),
        "rewards/margins": (rewards_c - rewards_r).mean(),
        "logps/chosen": mx.stop_gradient(pc).mean(),
        "logps/rejected": mx.stop_gradient(pr).mean(),
        "count/chosen": n,
        "count/rejected": n,
    }
    return loss, metrics
