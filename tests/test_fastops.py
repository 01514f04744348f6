"""fastops: the arithmetic exp and the ops built on it agree with MLX's own (values and
gradients), the model patch is scoped to its context, compiled traces are kept per mode, and
the malloc tuning is in effect."""

import sys

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.model.logprobs import compiled_sequence_logps, sequence_logps
from mlx_kto.runtime import fastattn, fastops
from mlx_kto.runtime import heap as _heap
from mlx_kto.train.loop import fast_paths

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten


def test_exp_nonpos_matches_float64_exp():
    x = np.concatenate([np.linspace(-87.0, 0.0, 200_001), [-0.0, -1e-30, -1e-7]])
    x32 = x.astype(np.float32)
    got = np.array(fastops.exp_nonpos(mx.array(x32)), dtype=np.float64)
    want = np.exp(x32.astype(np.float64))
    rel = np.abs(got - want) / want
    mlx_rel = np.abs(np.array(mx.exp(mx.array(x32)), np.float64) - want) / want
    # Both round y = x * log2(e) to float32 first, so the error grows with |x| the same way.
    assert rel.max() <= 1.5 * mlx_rel.max()
    near = x32 > -10
    assert rel[near].max() < 6e-7  # a few float32 ulp where softmax mass lives


def test_exp_nonpos_edges():
    x = mx.array([-88.0, -1000.0, -np.inf, np.nan, 0.0])
    out = np.array(fastops.exp_nonpos(x))
    assert out[0] == 0.0 and out[1] == 0.0 and out[2] == 0.0  # underflow to exactly 0
    assert np.isnan(out[3])
    assert out[4] == 1.0


def _vjp(fn, x, g):
    out, vjps = mx.vjp(fn, [x], [g])
    return out[0], vjps[0]


@pytest.mark.parametrize(
    "fast, ref",
    [
        (fastops.softmax, lambda x: mx.softmax(x, axis=-1, precise=True)),
        (fastops.logsumexp, lambda x: mx.logsumexp(x, axis=-1)),
        (fastops.silu, nn.silu),
    ],
)
def test_ops_and_gradients_match_mlx(fast, ref):
    x = mx.random.normal((4, 7, 300), key=mx.random.key(0)) * 6  # [4, 7, 300]
    g_shape = ref(x).shape
    g = mx.random.normal(g_shape, key=mx.random.key(1))
    y_fast, d_fast = _vjp(fast, x, g)
    y_ref, d_ref = _vjp(ref, x, g)
    scale = float(mx.abs(y_ref).max()) + 1.0
    assert float(mx.abs(y_fast - y_ref).max()) < 2e-6 * scale
    dscale = float(mx.abs(d_ref).max()) + 1.0
    assert float(mx.abs(d_fast - d_ref).max()) < 5e-6 * dscale


def test_ops_under_compile_and_masked_rows():
    x = mx.random.normal((3, 50), key=mx.random.key(2))
    x = mx.where(mx.arange(50)[None] < 10, -mx.inf, x)  # masked logits
    assert mx.allclose(mx.compile(fastops.softmax)(x), mx.softmax(x, axis=-1), atol=1e-7)
    assert mx.allclose(mx.compile(fastops.logsumexp)(x), mx.logsumexp(x, axis=-1), atol=1e-6)
    all_masked = mx.full((1, 5), -mx.inf)
    assert float(fastops.logsumexp(all_masked)[0]) == -np.inf


@pytest.mark.parametrize("mask", [None, "causal", "bool", "additive"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_attention_matches_fast_sdpa(mask, heads):
    hq, hkv = heads
    k0, k1, k2, k3 = mx.random.split(mx.random.key(3), 4)
    q = mx.random.normal((2, hq, 13, 16), key=k0)  # [B, Hq, L, D]
    k = mx.random.normal((2, hkv, 13, 16), key=k1)  # [B, Hkv, S, D]
    v = mx.random.normal((2, hkv, 13, 16), key=k2)
    if mask == "bool":
        m = mx.random.uniform(shape=(2, 1, 13, 13), key=k3) > 0.3
        m = m | mx.eye(13, dtype=mx.bool_)  # every query keeps one key
    elif mask == "additive":
        m = mx.random.normal((13, 13), key=k3)
    else:
        m = mask
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m)
    got = fastops.attention(q, k, v, 0.25, m)
    assert float(mx.abs(got - want).max()) < 1e-5
    g = mx.random.normal(want.shape, key=k3)
    d_got = mx.vjp(lambda q, k, v: fastops.attention(q, k, v, 0.25, m), [q, k, v], [g])[1]
    d_want = mx.vjp(
        lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=m),
        [q, k, v],
        [g],
    )[1]
    for a, b in zip(d_got, d_want, strict=True):
        assert float(mx.abs(a - b).max()) < 1e-4


@pytest.fixture
def lora_model(lora_model):
    """conftest's LoRA model, in eval mode (no dropout)."""
    model, _ = lora_model
    model.eval()
    return model


def _batch(vocab=500):
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(3, vocab, (3, 40)).astype(np.int32))  # [B, T]
    mask = mx.array(np.arange(40)[None].repeat(3, 0) >= np.array([[10], [20], [25]]))  # [B, T]
    return tokens, mask


def test_fast_ops_patch_is_scoped_and_model_agrees(lora_model):
    model = lora_model
    module = sys.modules[type(model).__module__]
    before = (module.scaled_dot_product_attention, module.swiglu)
    tokens, mask = _batch()

    def loss(m):
        return sequence_logps(m, tokens, mask, for_grad=True).sum()

    plain_v, plain_g = nn.value_and_grad(model, loss)(model)
    with fastops.fast_ops(model, enable=True) as on:
        assert on and fastops.active()
        assert module.swiglu is fastops.swiglu
        assert module.scaled_dot_product_attention.original is before[0]
        with fastops.fast_ops(model, enable=True):  # nested: a no-op
            pass
        assert fastops.active()
        fast_v, fast_g = nn.value_and_grad(model, loss)(model)
    assert (module.scaled_dot_product_attention, module.swiglu) == before
    assert not fastops.active()
    assert abs(float(fast_v) - float(plain_v)) < 1e-4 * abs(float(plain_v))
    pg, fg = dict(tree_flatten(plain_g)), dict(tree_flatten(fast_g))
    assert pg.keys() == fg.keys() and pg
    for k in pg:
        err = float(mx.linalg.norm(fg[k] - pg[k])) / float(mx.linalg.norm(pg[k]))
        assert err < 1e-4, (k, err)


def test_disabled_fast_ops_change_nothing(lora_model):
    module = sys.modules[type(lora_model).__module__]
    before = module.swiglu
    with fastops.fast_ops(lora_model, enable=False) as on:
        assert not on and not fastops.active() and module.swiglu is before


def test_compiled_traces_are_kept_per_mode(lora_model):
    model = lora_model
    tokens, mask = _batch()
    fn = compiled_sequence_logps(model)
    plain = fn(tokens, mask)
    calls = []
    real = fastattn.attention  # what the patched sdpa calls

    def spy(*a):
        calls.append(1)
        return real(*a)

    fastattn.attention = spy
    try:
        with fastops.fast_ops(model, enable=True):
            fast = fn(tokens, mask)  # a new trace: the patched attention is used
        n = len(calls)
        assert n == len(model.layers)
        again = fn(tokens, mask)  # outside again: the first trace, no patched op
        assert len(calls) == n
    finally:
        fastattn.attention = real
    assert mx.array_equal(again, plain)
    assert mx.allclose(fast, plain, rtol=1e-5)


def test_fast_paths_on_this_cpu(lora_model):
    with fast_paths(lora_model):
        assert fastops.active() == fastops.wanted()
    assert not fastops.active()


def test_malloc_tuning_in_effect_on_linux():
    if sys.platform.startswith("linux"):
        assert _heap.tuned
        _heap.untune()
        assert not _heap.tuned
        assert _heap.tune() and _heap.tuned


@pytest.mark.parametrize("L, S", [(13, 13), (5, 13), (1, 9)])
def test_causal_softmax_fuses_scale_and_mask(L, S):
    """One fused kernel for softmax(where(causal, scale * x, -inf)), queries the last L of S
    keys, values and gradients as MLX's ops give them, eager and compiled."""
    x = mx.random.normal((2, 3, L, S), key=mx.random.key(5)) * 4  # [B, H, L, S]
    g = mx.random.normal(x.shape, key=mx.random.key(6))
    keep = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]

    def ref(x):
        return mx.softmax(mx.where(keep, x * 0.3, -mx.inf), axis=-1, precise=True)

    y_ref, d_ref = _vjp(ref, x, g)
    for fn in (
        lambda x: fastops.causal_softmax(x, 0.3),
        mx.compile(lambda x: fastops.causal_softmax(x, 0.3)),
    ):
        y, d = _vjp(fn, x, g)
        assert float(mx.abs(y - y_ref).max()) < 2e-6
        assert float(mx.abs(d - d_ref).max()) < 5e-6 * (float(mx.abs(d_ref).max()) + 1)
        assert float(mx.abs(mx.where(keep, 0.0, y)).max()) == 0.0  # masked keys get nothing


def test_swiglu_matches_mlx_values_and_gradients():
    k0, k1, k2 = mx.random.split(mx.random.key(7), 3)
    gate = mx.random.normal((3, 5, 64), key=k0) * 4  # [B, T, I]
    x = mx.random.normal((3, 5, 64), key=k1)
    g = mx.random.normal((3, 5, 64), key=k2)

    def ref(gate, x):
        return nn.silu(gate) * x

    for fn in (fastops.swiglu, mx.compile(fastops.swiglu)):
        (y,), d = mx.vjp(fn, [gate, x], [g])
        (y_ref,), d_ref = mx.vjp(ref, [gate, x], [g])
        assert float(mx.abs(y - y_ref).max()) < 1e-5
        for a, b in zip(d, d_ref, strict=True):
            assert float(mx.abs(a - b).max()) < 1e-5 * (float(mx.abs(b).max()) + 1)


@pytest.mark.parametrize("L, S", [(5, 13), (1, 9)])
def test_causal_attention_queries_last_of_longer_keys(L, S):
    """Queries that are the last L of S keys (a cache-less suffix): values and gradients of
    q, k, v as MLX's own attention with the same causal mask gives them."""
    k0, k1, k2, k3 = mx.random.split(mx.random.key(8), 4)
    q = mx.random.normal((2, 6, L, 8), key=k0)  # [B, Hq, L, D]
    k = mx.random.normal((2, 3, S, 8), key=k1)  # [B, Hkv, S, D]
    v = mx.random.normal((2, 3, S, 8), key=k2)
    g = mx.random.normal((2, 6, L, 8), key=k3)
    keep = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]  # [L, S]

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=keep)

    (y_ref,), d_ref = mx.vjp(ref, [q, k, v], [g])
    for fn in (lambda q, k, v: fastops.attention(q, k, v, 0.35, "causal"),):
        for f in (fn, mx.compile(fn)):
            (y,), d = mx.vjp(f, [q, k, v], [g])
            assert float(mx.abs(y - y_ref).max()) < 1e-5
            for a, b in zip(d, d_ref, strict=True):
                assert float(mx.abs(a - b).max()) < 1e-4


def test_backward_keeps_no_attention_probabilities_or_mlp_products():
    """Under a compiled value_and_grad, each extra block of causal attention + SwiGLU holds
    only its inputs for the backward (q, k, v, gate, x), not the [B, H, L, S] scores and
    probabilities or silu(gate) and the product: the peak grows per block by less than one
    score-sized array (one kept array would be 1.0)."""
    B, H, L, D = 2, 8, 256, 16
    score_bytes = B * H * L * L * 4

    def blocks(n):
        def loss(x, w):
            for _ in range(n):
                q = k = v = (x * w).reshape(B, L, H, D).transpose(0, 2, 1, 3)
                a = fastops.attention(q, k, v, 0.25, "causal")  # [B, H, L, D]
                h = a.transpose(0, 2, 1, 3).reshape(B, L, H * D)  # [B, L, H*D]
                x = x + fastops.swiglu(h, x)
            return x.sum()

        return mx.compile(mx.grad(loss, argnums=1))

    x = mx.random.normal((B, L, H * D), key=mx.random.key(9))  # [B, L, 128]
    w = mx.ones((H * D,))
    peaks = {}
    for n in (2, 6):
        fn = blocks(n)
        mx.eval(fn(x, w))
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(x, w))
        peaks[n] = mx.get_peak_memory() - base
    per_block = (peaks[6] - peaks[2]) / 4
    assert per_block < 0.75 * score_bytes, (per_block, score_bytes)  # before: 1.3
