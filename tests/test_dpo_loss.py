"""dpo_loss against dpo-spec.md's worked numbers (TRL 1.16.0 `DPOTrainer`), and autograd."""

import math

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.train.loss import dpo_loss, merge_metrics, metrics_to_floats

import mlx.core as mx
import numpy as np
import pytest

PC = [-10.0, -22.0, -7.25, -15.5]
PR = [-12.5, -21.0, -9.0, -15.0]
RC = [-10.8, -21.4, -7.0, -16.0]
RR = [-12.0, -21.5, -8.0, -15.2]


def f32(x):
    return mx.array(x, dtype=mx.float32)


@pytest.mark.parametrize(
    "beta,loss,per_pair,chosen,rejected,margins",
    [
        (
            0.1,
            0.6786317326,
            [0.63025819, 0.74965892, 0.65635014, 0.67825968],
            0.01125,
            -0.02,
            0.03125,
        ),
        (
            0.5,
            0.6424070323,
            [0.42005534, 1.00549248, 0.52312326, 0.62095705],
            0.05625,
            -0.1,
            0.15625,
        ),
    ],
)
def test_worked_numbers(beta, loss, per_pair, chosen, rejected, margins):
    value, m = dpo_loss(f32(PC), f32(PR), f32(RC), f32(RR), beta=beta)
    m = metrics_to_floats(m)
    assert value.item() == pytest.approx(loss, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(chosen, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx(rejected, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx(margins, abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(0.75)
    assert m["logps/chosen"] == pytest.approx(np.mean(PC), abs=1e-5)
    assert m["logps/rejected"] == pytest.approx(np.mean(PR), abs=1e-5)
    # Each pair alone gives its own per-pair loss.
    for i, expected in enumerate(per_pair):
        one, _ = dpo_loss(
            f32(PC[i : i + 1]),
            f32(PR[i : i + 1]),
            f32(RC[i : i + 1]),
            f32(RR[i : i + 1]),
            beta=beta,
        )
        assert one.item() == pytest.approx(expected, abs=1e-6)


def test_gradient_matches_spec_and_reference_is_detached():
    def f(pc, pr, rc, rr):
        return dpo_loss(pc, pr, rc, rr, beta=0.1)[0]

    g = mx.grad(f, argnums=(0, 1, 2, 3))(f32(PC), f32(PR), f32(RC), f32(RR))
    expected = [-0.01168864, -0.01318681, -0.01203147, -0.01231251]
    np.testing.assert_allclose(np.array(g[0]), expected, atol=1e-7)
    np.testing.assert_allclose(np.array(g[1]), [-x for x in expected], atol=1e-7)
    assert not np.any(np.array(g[2])) and not np.any(np.array(g[3]))


def test_gradient_matches_closed_form():
    # d/dpc of -log σ(βh)/n = -β σ(-βh) / n
    beta = 0.3
    h = [(a - c) - (b - d) for a, b, c, d in zip(PC, PR, RC, RR)]
    closed = [-beta / (1 + math.exp(beta * x)) / len(h) for x in h]
    g = mx.grad(lambda pc: dpo_loss(pc, f32(PR), f32(RC), f32(RR), beta=beta)[0])(f32(PC))
    np.testing.assert_allclose(np.array(g), closed, atol=1e-7)


def test_no_overflow_for_large_margins():
    right = dpo_loss(f32([0.0]), f32([-5000.0]), f32([-5000.0]), f32([0.0]), beta=1.0)[0]
    assert right.item() == 0.0  # h = +10000
    wrong = dpo_loss(f32([-5000.0]), f32([0.0]), f32([0.0]), f32([-5000.0]), beta=1.0)[0]
    assert wrong.item() == pytest.approx(10000.0)  # h = -10000


def test_ipo_normalises_by_tokens():
    beta = 0.1
    nc, nr = [4, 10, 2, 5], [3, 8, 6, 5]
    value, _ = dpo_loss(
        f32(PC),
        f32(PR),
        f32(RC),
        f32(RR),
        beta=beta,
        loss_type="ipo",
        chosen_tokens=mx.array(nc),
        rejected_tokens=mx.array(nr),
    )
    expected = np.mean(
        [
            ((a - c) / x - (b - d) / y - 1 / (2 * beta)) ** 2
            for a, b, c, d, x, y in zip(PC, PR, RC, RR, nc, nr)
        ]
    )
    assert value.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(f32(PC), f32(PR), f32(RC), f32(RR), loss_type="ipo")


def test_micro_batches_merge_to_the_whole_batch():
    whole = metrics_to_floats(dpo_loss(f32(PC), f32(PR), f32(RC), f32(RR))[1])
    a = dpo_loss(f32(PC[:1]), f32(PR[:1]), f32(RC[:1]), f32(RR[:1]))[1]
    b = dpo_loss(f32(PC[1:]), f32(PR[1:]), f32(RC[1:]), f32(RR[1:]))[1]
    merged = merge_metrics(a, b)
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
    ):
        assert merged[key] == pytest.approx(whole[key], abs=1e-6), key


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="paired loss_type"):
        dpo_loss(f32(PC), f32(PR), f32(RC), f32(RR), loss_type="kto")
