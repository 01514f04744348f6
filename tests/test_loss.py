"""kto_loss against the worked example of kto-spec.md 5.2 (TRL 1.16.0 numbers, double precision)."""

import math
from functools import partial

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.train.loss import kto_loss, merge_metrics, metrics_to_floats

import mlx.core as mx
import numpy as np
import pytest

ATOL = 1e-6  # spec values are double; float32 reaches them at this tolerance

# kto-spec.md 5.2 batch: label, policy, reference, KL policy, KL reference.
LABELS = [True, False, True, False]
POLICY = [-10.00, -22.00, -7.25, -15.50]
REF = [-10.80, -21.40, -7.00, -16.00]
KL_POLICY = [-30.0, -11.2, -25.4, -9.0]
KL_REF = [-30.4, -11.0, -25.6, -9.6]
KL_REF_NEGATIVE = [-29.0, -11.0, -25.0, -9.2]  # scenario C


def arrays(policy=POLICY, ref=REF, kl_policy=KL_POLICY, kl_ref=KL_REF, labels=LABELS):
    f32 = partial(mx.array, dtype=mx.float32)
    return f32(policy), f32(ref), f32(kl_policy), f32(kl_ref), mx.array(labels)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def analytic_grad(z_rows, labels, weights, beta, n):
    """d loss / d policy_logp_i = ∓ λ β σ(z)(1 − σ(z)) / N (kto-spec.md 5.2), z = loss argument."""
    out = []
    for z, lab, w in zip(z_rows, labels, weights, strict=True):
        s = sigmoid(z)
        out.append((-1.0 if lab else 1.0) * w * beta * s * (1 - s) / n)
    return out


def grads(inputs, **kw):
    """Loss value and gradients w.r.t. all four log-prob inputs."""

    def f(p, r, klp, klr):
        return kto_loss(p, r, klp, klr, inputs[4], **kw)[0]

    return mx.value_and_grad(f, argnums=(0, 1, 2, 3))(*inputs[:4])


def assert_close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.array(actual, dtype=np.float64), expected, rtol=0, atol=atol)


SCENARIO_A_METRICS = {
    "kl": 0.25,
    "rewards/chosen": 0.0275,
    "rewards/rejected": -0.005,
    "rewards/margins": 0.0325,
    "logps/chosen": -8.625,
    "logps/rejected": -18.75,
    "count/chosen": 2.0,
    "count/rejected": 2.0,
    # row 0 (r=+0.8, desirable) and row 1 (r=-0.6, undesirable) right; rows 2 and 3 wrong
    "rewards/accuracy": 0.5,
}


def test_scenario_a_loss_metrics_gradients():
    inputs = arrays()
    loss, metrics = kto_loss(*inputs, beta=0.1)
    assert loss.dtype == mx.float32 and loss.shape == ()
    assert_close(loss, 0.4959408303)
    floats = metrics_to_floats(metrics)
    assert set(floats) == set(SCENARIO_A_METRICS) | {"loss"}
    for k, v in SCENARIO_A_METRICS.items():
        assert_close(floats[k], v)
    assert_close(floats["loss"], 0.4959408303)

    value, (g_pol, g_ref, g_klp, g_klr) = grads(inputs, beta=0.1)
    assert_close(value, 0.4959408303)
    assert_close(g_pol, [-0.0062452758, 0.0062387245, -0.0062460954, 0.0062490235])
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.array(g) == 0.0)


def test_scenario_b_weights_divide_by_rows_not_weight_sum():
    inputs = arrays()
    loss, metrics = kto_loss(*inputs, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert_close(loss, 0.7421939452)
    floats = metrics_to_floats(metrics)
    for k, v in SCENARIO_A_METRICS.items():  # metrics unchanged by the weights
        assert_close(floats[k], v)
    _, (g_pol, g_ref, g_klp, g_klr) = grads(inputs, beta=0.1, undesirable_weight=2.0)
    assert_close(g_pol, [-0.0062452758, 0.0124774490, -0.0062460954, 0.0124980471])
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.array(g) == 0.0)


def test_scenario_c_negative_kl_clamped_to_zero():
    inputs = arrays(kl_ref=KL_REF_NEGATIVE)
    loss, metrics = kto_loss(*inputs, beta=0.1)
    assert_close(loss, 0.4959405573)
    floats = metrics_to_floats(metrics)
    assert floats["kl"] == 0.0
    # per-row losses of the spec: chosen 0.4800106598, 0.5062496745; rejected 0.4850044984, 0.5124973965
    assert_close(floats["loss"], (0.4800106598 + 0.4850044984 + 0.5062496745 + 0.5124973965) / 4)
    r = [p - q for p, q in zip(POLICY, REF, strict=True)]
    z = [0.1 * (ri - 0.0) if lab else 0.1 * (0.0 - ri) for ri, lab in zip(r, LABELS, strict=True)]
    _, (g_pol, g_ref, g_klp, g_klr) = grads(inputs, beta=0.1)
    assert_close(g_pol, analytic_grad(z, LABELS, [1.0] * 4, 0.1, 4))
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.array(g) == 0.0)


def test_scenario_d_single_label_micro_batch():
    rows = [0, 2]
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    inputs = arrays(pick(POLICY), pick(REF), pick(KL_POLICY), pick(KL_REF), pick(LABELS))
    loss, metrics = kto_loss(*inputs, beta=0.1)
    assert_close(loss, 0.5006245692)
    assert_close((0.4875026035 + 0.5137465349) / 2, 0.5006245692)
    floats = metrics_to_floats(metrics)
    assert set(floats) == {
        "loss",
        "kl",
        "rewards/chosen",
        "logps/chosen",
        "count/chosen",
        "count/rejected",
        "rewards/accuracy",
    }
    assert_close(floats["kl"], 0.3)
    assert_close(floats["rewards/chosen"], 0.0275)
    assert_close(floats["logps/chosen"], -8.625)
    assert floats["count/chosen"] == 2.0 and floats["count/rejected"] == 0.0
    assert_close(floats["rewards/accuracy"], 0.5)
    # raw metrics of the absent side read 0, never NaN
    assert float(metrics["rewards/rejected"]) == 0.0 and float(metrics["logps/rejected"]) == 0.0
    _, (g_pol, g_ref, g_klp, g_klr) = grads(inputs, beta=0.1)
    z = [0.1 * (0.8 - 0.3), 0.1 * (-0.25 - 0.3)]
    assert_close(g_pol, analytic_grad(z, [True, True], [1.0, 1.0], 0.1, 2))
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.array(g) == 0.0)


def test_scenario_d_all_undesirable():
    rows = [1, 3]
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    inputs = arrays(pick(POLICY), pick(REF), pick(KL_POLICY), pick(KL_REF), pick(LABELS))
    loss, metrics = kto_loss(*inputs, beta=0.1, undesirable_weight=1.5)
    kl = max(0.0, (-0.2 + 0.6) / 2)
    expected = 1.5 * ((1 - sigmoid(0.1 * (kl + 0.6))) + (1 - sigmoid(0.1 * (kl - 0.5)))) / 2
    assert_close(loss, expected)
    floats = metrics_to_floats(metrics)
    assert "rewards/chosen" not in floats and "rewards/margins" not in floats
    assert_close(floats["rewards/rejected"], -0.005)
    assert_close(floats["logps/rejected"], -18.75)


def test_scenario_e_apo_zero_unpaired():
    policy, ref, _, _, labels = arrays()
    loss, metrics = kto_loss(
        policy, ref, None, None, labels, beta=0.1, loss_type="apo_zero_unpaired"
    )
    assert_close(loss, 0.4959405573)
    floats = metrics_to_floats(metrics)
    assert floats["kl"] == 0.0
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
        assert_close(floats[k], SCENARIO_A_METRICS[k])

    def f(p, r, klp, klr):
        return kto_loss(p, r, klp, klr, labels, beta=0.1, loss_type="apo_zero_unpaired")[0]

    inputs = arrays()
    _, (g_pol, g_ref, g_klp, g_klr) = mx.value_and_grad(f, argnums=(0, 1, 2, 3))(*inputs[:4])
    r = [p - q for p, q in zip(POLICY, REF, strict=True)]
    # chosen d(1 − σ(βr))/dr = −βσ(1−σ); rejected dσ(βr)/dr = +βσ(1−σ): same form, z = βr
    assert_close(g_pol, analytic_grad([0.1 * x for x in r], LABELS, [1.0] * 4, 0.1, 4))
    for g in (g_ref, g_klp, g_klr):
        assert np.all(np.array(g) == 0.0)
    # the KL inputs are ignored, whatever they hold
    loss_kl, _ = kto_loss(*inputs, beta=0.1, loss_type="apo_zero_unpaired")
    assert float(loss_kl) == float(loss)


def test_integer_labels_and_fp16_inputs():
    p, r, klp, klr, _ = arrays()
    loss_bool, _ = kto_loss(p, r, klp, klr, mx.array(LABELS), beta=0.1)
    loss_int, m = kto_loss(p, r, klp, klr, mx.array([1, 0, 1, 0], dtype=mx.int32), beta=0.1)
    assert float(loss_int) == float(loss_bool)
    assert float(m["count/chosen"]) == 2.0
    loss_half, _ = kto_loss(*(x.astype(mx.float16) for x in (p, r, klp, klr)), mx.array(LABELS))
    assert loss_half.dtype == mx.float32
    assert abs(float(loss_half) - 0.4959408303) < 1e-3  # fp16 inputs lose digits, not the dtype


def test_compiled_equals_eager():
    inputs = arrays()
    for kw in (
        {"beta": 0.1},
        {"beta": 0.1, "undesirable_weight": 2.0},
        {"beta": 0.5, "loss_type": "apo_zero_unpaired"},
    ):
        eager_loss, eager_metrics = kto_loss(*inputs, **kw)
        compiled = mx.compile(partial(kto_loss, **kw))
        loss, metrics = compiled(*inputs)
        assert float(loss) == pytest.approx(float(eager_loss), abs=1e-7)
        for k in eager_metrics:
            assert float(metrics[k]) == pytest.approx(float(eager_metrics[k]), abs=1e-7), k

        def f(p, r, klp, klr, lab, kw=kw):
            return kto_loss(p, r, klp, klr, lab, **kw)

        eager_vg = mx.value_and_grad(f)(*inputs)
        compiled_vg = mx.compile(mx.value_and_grad(f))(*inputs)
        np.testing.assert_allclose(
            np.array(compiled_vg[1]), np.array(eager_vg[1]), rtol=0, atol=1e-9
        )
        assert float(compiled_vg[0][0]) == pytest.approx(float(eager_vg[0][0]), abs=1e-7)
    # a compiled function sees new values (no array value baked in), incl. a single-label batch
    compiled = mx.compile(partial(kto_loss, beta=0.1))
    loss_c, _ = compiled(*arrays(kl_ref=KL_REF_NEGATIVE))
    assert_close(loss_c, 0.4959405573)
    loss_d, metrics_d = compiled(*arrays(labels=[True, True, True, True]))
    eager_d, eager_md = kto_loss(*arrays(labels=[True, True, True, True]), beta=0.1)
    assert float(loss_d) == pytest.approx(float(eager_d), abs=1e-7)
    assert float(metrics_d["count/rejected"]) == 0.0
    assert metrics_to_floats(metrics_d).keys() == metrics_to_floats(eager_md).keys()


def test_unknown_loss_type_and_missing_kl():
    inputs = arrays()
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(*inputs, loss_type="sigmoid")
    with pytest.raises(ValueError, match="kl"):
        kto_loss(inputs[0], inputs[1], None, None, inputs[4], loss_type="kto")


def test_metrics_to_floats_drops_absent_side():
    _, metrics = kto_loss(*arrays(labels=[False] * 4))
    floats = metrics_to_floats(metrics)
    assert all(isinstance(v, float) for v in floats.values())
    assert "rewards/chosen" not in floats and "logps/chosen" not in floats
    assert "rewards/margins" not in floats
    assert floats["count/chosen"] == 0.0 and floats["count/rejected"] == 4.0
    assert "rewards/rejected" in floats and "logps/rejected" in floats
    # metrics that have no counts are passed through
    assert metrics_to_floats({"grad_norm": mx.array(2.5)}) == {"grad_norm": 2.5}


def test_merge_metrics_count_weighted():
    # Splitting the 5.2 batch in two (rows 0,1,2 and row 3) and merging gives the side means of
    # the whole batch; loss/kl/accuracy are row-weighted means of the parts.
    def part(rows):
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return kto_loss(*arrays(*(pick(x) for x in (POLICY, REF, KL_POLICY, KL_REF, LABELS))))

    (loss1, m1), (loss2, m2) = part([0, 1, 2]), part([3])
    merged = merge_metrics(m1, metrics_to_floats(m2))  # mx and float dicts alike
    assert merged["count/chosen"] == 2.0 and merged["count/rejected"] == 2.0
    for k in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert_close(merged[k], SCENARIO_A_METRICS[k])
    assert_close(merged["loss"], (3 * float(loss1) + 1 * float(loss2)) / 4)
    assert_close(merged["kl"], (3 * float(m1["kl"]) + float(m2["kl"])) / 4)
    assert_close(merged["rewards/accuracy"], 0.5)
    # part 2 has no chosen rows: its (dropped) chosen entries weigh nothing
    assert "rewards/chosen" not in metrics_to_floats(m2)


def test_merge_metrics_absent_sides_and_empty_accumulator():
    only_c = {"loss": 0.4, "kl": 0.1, "rewards/chosen": 0.2, "logps/chosen": -5.0}
    only_c |= {"count/chosen": 2.0, "count/rejected": 0.0, "rewards/accuracy": 1.0}
    only_r = {"loss": 0.6, "kl": 0.3, "rewards/rejected": -0.1, "logps/rejected": -9.0}
    only_r |= {"count/chosen": 0.0, "count/rejected": 6.0, "rewards/accuracy": 0.5}
    assert merge_metrics({}, only_c) == only_c
    assert merge_metrics(only_c, {}) == only_c
    assert "rewards/margins" not in merge_metrics(only_c, only_c)
    merged = merge_metrics(only_c, only_r)
    assert merged["count/chosen"] == 2.0 and merged["count/rejected"] == 6.0
    assert merged["rewards/chosen"] == pytest.approx(0.2)
    assert merged["rewards/rejected"] == pytest.approx(-0.1)
    assert merged["rewards/margins"] == pytest.approx(0.3)
    assert merged["loss"] == pytest.approx((2 * 0.4 + 6 * 0.6) / 8)
    assert merged["kl"] == pytest.approx((2 * 0.1 + 6 * 0.3) / 8)
    assert merged["rewards/accuracy"] == pytest.approx((2 * 1.0 + 6 * 0.5) / 8)
    # accumulate over several micro-batches: same as merging in any order
    acc = {}
    for m in (only_c, only_r, only_c):
        acc = merge_metrics(acc, m)
    assert acc["count/chosen"] == 4.0
    assert acc["loss"] == pytest.approx((4 * 0.4 + 6 * 0.6) / 10)
    assert merge_metrics(only_r, merge_metrics(only_c, only_c))["loss"] == pytest.approx(
        acc["loss"]
    )
    # without counts: plain mean
    assert merge_metrics({"x": 1.0}, {"x": 3.0}) == {"x": 2.0}
