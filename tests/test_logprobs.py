"""sequence_logps / token_logps: the kto-spec.md 5.1 example, masking, chunking, quantized and
tied heads, gradients through LoRA, compile, row independence."""

from functools import partial

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.model import head_logps, logprobs
from mlx_kto.model.logprobs import (
    can_split,
    default_chunk_size,
    hidden_states,
    lm_head,
    sequence_logps,
    token_logps,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

# kto-spec.md 5.1: vocab 4, prompt = 2 tokens; logits rows 0..3 (row 4 is never used).
SPEC_TOKENS = [0, 1, 2, 3, 1]
SPEC_MASK = [0, 0, 1, 1, 1]
SPEC_LOGITS = [[0, 0, 0, 0], [1, 0, 0, 0], [0, 2, 0, 1], [0.5, 0.5, 0, 0], [9, -9, 3, 7]]
SPEC_TOKEN_LOGPS = [0.0, -1.743668380628679, -1.4938117090722387, -1.167224164740052]
SPEC_SEQ_LOGP = -4.404704254440969
# Sums over many tokens of a random model reach |x| ~ 200, where one float32 ulp is 1.5e-5:
# compare with atol 1e-5 plus 1 ppm of the value.
RTOL = 1e-6


class FakeModel:
    """Returns fixed logits [1, L, V] for any input of length L (cannot be split: no trunk)."""

    def __init__(self, logits):
        self.logits = mx.array(logits, dtype=mx.float32)[None]  # [1, L, V]

    def __call__(self, inputs):
        return self.logits[:, : inputs.shape[1]]


def spec_inputs(tokens=SPEC_TOKENS, mask=SPEC_MASK, dtype=mx.int32):
    return mx.array([tokens]), mx.array([mask], dtype=dtype)


def test_spec_token_level_example():
    model = FakeModel(SPEC_LOGITS)
    assert not can_split(model)
    tokens, mask = spec_inputs()
    out = sequence_logps(model, tokens, mask)
    assert out.shape == (1,) and out.dtype == mx.float32
    assert float(out[0]) == pytest.approx(SPEC_SEQ_LOGP, abs=1e-6)
    per_token = token_logps(model, tokens, mask)
    assert per_token.shape == (1, 4)
    np.testing.assert_allclose(np.array(per_token[0]), SPEC_TOKEN_LOGPS, rtol=0, atol=1e-6)
    # chunking the fp32 log-softmax of full logits changes nothing
    for chunk in (1, 2, 3):
        assert float(sequence_logps(model, tokens, mask, chunk)[0]) == pytest.approx(
            SPEC_SEQ_LOGP, abs=1e-6
        )


@pytest.mark.parametrize("dtype", [mx.bool_, mx.int32, mx.float32])
def test_mask_dtypes_and_position_zero(dtype):
    model = FakeModel(SPEC_LOGITS)
    tokens, mask = spec_inputs(dtype=dtype)
    assert float(sequence_logps(model, tokens, mask)[0]) == pytest.approx(SPEC_SEQ_LOGP, abs=1e-6)
    # position 0 can never be a target: setting its mask bit changes nothing
    tokens, mask = spec_inputs(mask=[1, 0, 1, 1, 1], dtype=dtype)
    assert float(sequence_logps(model, tokens, mask)[0]) == pytest.approx(SPEC_SEQ_LOGP, abs=1e-6)


def test_prompt_and_padding_excluded_even_with_weird_logits():
    tokens, mask = spec_inputs()
    # prompt-position logits (row 0 predicts a prompt token) do not matter
    weird_prompt = [[50.0, -3.0, 7.0, 1e4]] + SPEC_LOGITS[1:]
    assert float(sequence_logps(FakeModel(weird_prompt), tokens, mask)[0]) == pytest.approx(
        SPEC_SEQ_LOGP, abs=1e-6
    )
    # right padding with inf / NaN / huge logits and arbitrary (even out-of-vocab) padded ids
    inf, nan = float("inf"), float("nan")
    padded_logits = SPEC_LOGITS[:4] + [[inf, 0, 0, 0], [nan, nan, nan, nan], [1e30, -inf, 0, 0]]
    model = FakeModel(padded_logits)
    for pad_ids in ([0, 0, 0], [3, 2, 1], [999, -100, 7]):
        tokens, mask = spec_inputs(SPEC_TOKENS + pad_ids, SPEC_MASK + [0, 0, 0])
        per_token = token_logps(model, tokens, mask)
        assert np.all(np.isfinite(np.array(per_token)))
        assert np.all(np.array(per_token[0, 4:]) == 0.0)
        for chunk in (None, 2):
            value = float(sequence_logps(model, tokens, mask, chunk)[0])
            assert value == pytest.approx(SPEC_SEQ_LOGP, abs=1e-6)


def test_shape_errors():
    model = FakeModel(SPEC_LOGITS)
    with pytest.raises(ValueError, match="completion_mask"):
        sequence_logps(model, mx.array([SPEC_TOKENS]), mx.array([SPEC_MASK[:-1]]))
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(model, *spec_inputs(), chunk_size=0)
    assert sequence_logps(model, mx.array([[1]]), mx.array([[1]])).tolist() == [0.0]


# ---------------------------------------------------------------------------- real models


def _load(path, quantize=False):
    from mlx_lm import load

    model, _ = load(str(path))
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    model.eval()
    return model


@pytest.fixture(scope="module")
def models(tiny_llama, tiny_qwen2):
    return {
        "llama": _load(tiny_llama),
        "qwen2": _load(tiny_qwen2),
        "llama-q4": _load(tiny_llama, quantize=True),
        "qwen2-q4": _load(tiny_qwen2, quantize=True),
    }


def _batch(seed=0, B=3, T=13):
    """Random tokens with per-row prompt length and right padding (pad id 0)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 500, (B, T))
    starts = rng.integers(1, T // 2, B)
    ends = np.maximum(starts + 1, T - rng.integers(0, T // 3, B))
    pos = np.arange(T)[None]
    mask = (pos >= starts[:, None]) & (pos < ends[:, None])  # [B, T]
    tokens = np.where(pos < ends[:, None], tokens, 0)
    return mx.array(tokens), mx.array(mask)


def _reference(model, tokens, mask):
    """Float64 log-softmax of the full `model(tokens)` logits, summed over completion targets."""
    logits = np.array(model(tokens).astype(mx.float32), dtype=np.float64)  # [B, T, V]
    logits = logits - logits.max(-1, keepdims=True)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    t, m = np.array(tokens), np.array(mask)
    picked = np.take_along_axis(lsm[:, :-1], t[:, 1:, None], axis=-1)[..., 0]  # [B, T-1]
    return (picked * m[:, 1:]).sum(-1)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-q4", "qwen2-q4"])
def test_split_chunked_matches_full_logits(models, name):
    model = models[name]
    assert can_split(model)
    tied = name.startswith("qwen2")
    head = lm_head(model)
    if tied:
        assert not hasattr(model, "lm_head")
        assert head == model.model.embed_tokens.as_linear
        expect = nn.QuantizedEmbedding if name.endswith("q4") else nn.Embedding
        assert type(model.model.embed_tokens) is expect
    else:
        assert head is model.lm_head
        expect = nn.QuantizedLinear if name.endswith("q4") else nn.Linear
        assert type(model.lm_head) is expect
    tokens, mask = _batch()
    h = hidden_states(model, tokens)
    assert h.shape == (*tokens.shape, model.args.hidden_size)
    np.testing.assert_allclose(np.array(head(h)), np.array(model(tokens)), rtol=1e-5, atol=1e-5)

    expected = _reference(model, tokens, mask)
    full = sequence_logps(model, tokens, mask)
    np.testing.assert_allclose(np.array(full), expected, rtol=1e-6, atol=2e-5)
    for chunk in (1, 3, 5, 12, 100):
        chunked = sequence_logps(model, tokens, mask, chunk_size=chunk)
        np.testing.assert_allclose(np.array(chunked), np.array(full), rtol=RTOL, atol=1e-5)
    # the unsplit fallback (`model(inputs)`) agrees with the split path
    fallback = FakeWrapper(model)
    assert not can_split(fallback)
    np.testing.assert_allclose(
        np.array(sequence_logps(fallback, tokens, mask, 4)), np.array(full), rtol=RTOL, atol=1e-5
    )


class FakeWrapper:
    """A model that can only be called whole."""

    def __init__(self, model):
        self.inner = model

    def __call__(self, inputs):
        return self.inner(inputs)


def test_padding_and_rows_are_independent(models):
    model = models["llama"]
    tokens, mask = _batch(seed=1, B=2, T=10)
    alone = sequence_logps(model, tokens[:1], mask[:1])
    # row 0 padded to length 16 next to a longer row 1
    pad = mx.zeros((2, 6), dtype=tokens.dtype)
    long_tokens = mx.concatenate([tokens, pad], axis=1)
    long_tokens[1, 10:] = mx.array([5, 6, 7, 8, 9, 10])
    long_mask = mx.concatenate([mask, mx.zeros((2, 6), dtype=mask.dtype)], axis=1)
    long_mask[1, 10:] = True
    together = sequence_logps(model, long_tokens, long_mask, chunk_size=4)
    assert float(together[0]) == pytest.approx(float(alone[0]), rel=RTOL, abs=1e-5)
    # the padded ids themselves do not matter
    other_pad = mx.where(long_mask | (mx.arange(16)[None] < 10), long_tokens, 77)
    again = sequence_logps(model, other_pad, long_mask)
    np.testing.assert_allclose(np.array(again), np.array(together), rtol=RTOL, atol=1e-5)
    # and neither does a different row 1
    swapped = mx.array(long_tokens)
    swapped[1, 1:] = mx.array(np.arange(20, 35))
    value = float(sequence_logps(model, swapped, long_mask)[0])
    assert value == pytest.approx(float(alone[0]), rel=RTOL, abs=1e-5)


def test_default_chunk_size(monkeypatch, models):
    assert default_chunk_size(4, 512) is None
    assert default_chunk_size(4, None) is None
    big = default_chunk_size(4, 151_936)
    assert big is not None and 16 <= big <= 32
    assert default_chunk_size(64, 256_000) == 16  # floor
    # make the tiny vocab "large": the default then chunks
    seen = []
    real = head_logps.chunked_target_logps

    def spy(module, head, h, targets, chunk_size):
        seen.append(chunk_size)
        return real(module, head, h, targets, chunk_size)

    model = models["qwen2"]
    tokens, mask = _batch(seed=2)
    unchunked = sequence_logps(model, tokens, mask)
    monkeypatch.setattr(logprobs, "LARGE_VOCAB", 100)
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 3 * 512 * 4)
    monkeypatch.setattr(head_logps, "chunked_target_logps", spy)
    assert default_chunk_size(3, 512) == 16  # never below 16 positions
    monkeypatch.setattr(logprobs, "CHUNK_LOGITS", 3 * 512 * 20)
    assert default_chunk_size(3, 512) == 20
    tokens, mask = _batch(seed=2, T=45)
    chunked = sequence_logps(model, tokens, mask)
    assert seen == [20]
    monkeypatch.setattr(logprobs, "LARGE_VOCAB", 1 << 20)
    np.testing.assert_allclose(
        np.array(chunked), np.array(sequence_logps(model, tokens, mask)), rtol=RTOL, atol=1e-5
    )
    assert seen == [20]  # vocab no longer "large": no chunking
    assert unchunked.shape == (3,)


@pytest.mark.parametrize("path_fixture", ["tiny_llama", "tiny_qwen2"])
def test_gradients_flow_to_lora(request, path_fixture):
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _load(request.getfixturevalue(path_fixture))
    model.freeze()
    # A fixed LoRA init: MLX's default seed is time-based, and for some inits the SGD step
    # below (lr 0.05) overshoots, so the loss-decrease check was flaky across runs.
    mx.random.seed(5)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    model.train()
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    tokens, mask = _batch(seed=3)

    def loss(model, tokens, mask, chunk):
        return -sequence_logps(model, tokens, mask, chunk).sum()

    loss_and_grad = nn.value_and_grad(model, loss)
    value, grads = loss_and_grad(model, tokens, mask, None)
    grads = dict(tree_flatten(grads))
    assert set(grads) == set(names)
    # lora_b starts at 0, so only lora_b has a gradient before the first update
    for k, g in grads.items():
        nonzero = float(mx.abs(g).max()) > 0
        assert nonzero == k.endswith("lora_b"), k
    # chunked (checkpointed head) gradients equal the unchunked ones
    value_c, grads_c = loss_and_grad(model, tokens, mask, 3)
    assert float(value_c) == pytest.approx(float(value), abs=1e-4)
    for k, g in tree_flatten(grads_c):
        # float32 sums of ~1e2 terms of size ~4: absolute noise ~1e-6..1e-5 on cancelling entries
        np.testing.assert_allclose(np.array(g), np.array(grads[k]), rtol=1e-4, atol=2e-5)

    # one SGD step: now every LoRA matrix gets a gradient, and the loss moved
    optim.SGD(learning_rate=0.05).update(model, tree_unflatten(list(grads.items())))
    value2, grads2 = loss_and_grad(model, tokens, mask, 3)
    assert float(value2) < float(value)
    for k, g in tree_flatten(grads2):
        assert float(mx.abs(g).max()) > 0, k

    # compiled (mlx-lm style, model state as compile inputs) == eager, chunked and not
    state = [model.state]
    for chunk in (None, 4):

        @partial(mx.compile, inputs=state, outputs=state)
        def step(tokens, mask, chunk=chunk):
            return loss_and_grad(model, tokens, mask, chunk)

        value_e, grads_e = loss_and_grad(model, tokens, mask, chunk)
        value_k, grads_k = step(tokens, mask)
        assert float(value_k) == pytest.approx(float(value_e), abs=1e-4)
        grads_e = dict(tree_flatten(grads_e))
        for k, g in tree_flatten(grads_k):
            np.testing.assert_allclose(np.array(g), np.array(grads_e[k]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("path_fixture", ["tiny_llama", "tiny_qwen2"])
def test_trainable_head_gets_chunked_gradients(request, path_fixture):
    """Full fine-tuning: the head (lm_head, or the tied embedding used twice) is trainable, and
    the chunked head passes its gradient on exactly like the unchunked one."""
    model = _load(request.getfixturevalue(path_fixture))
    tokens, mask = _batch(seed=4, T=11)

    def loss(model, tokens, mask, chunk):
        return -sequence_logps(model, tokens, mask, chunk).sum()

    loss_and_grad = nn.value_and_grad(model, loss)
    value, grads = loss_and_grad(model, tokens, mask, None)
    grads = dict(tree_flatten(grads))
    head = "lm_head.weight" if "lm_head.weight" in grads else "model.embed_tokens.weight"
    assert float(mx.abs(grads[head]).max()) > 0
    value_c, grads_c = loss_and_grad(model, tokens, mask, 4)
    assert float(value_c) == pytest.approx(float(value), rel=RTOL, abs=1e-5)
    grads_c = dict(tree_flatten(grads_c))
    assert set(grads_c) == set(grads)
    for k, g in grads.items():
        np.testing.assert_allclose(np.array(grads_c[k]), np.array(g), rtol=1e-4, atol=1e-6)
    # the module holds plain parameters afterwards: a second call gives the same gradient
    _, again = loss_and_grad(model, tokens, mask, 4)
    np.testing.assert_allclose(
        np.array(dict(tree_flatten(again))[head]), np.array(grads_c[head]), rtol=1e-5, atol=1e-7
    )


def test_bfloat16_model_gives_float32_logps(tiny_qwen2):
    model = _load(tiny_qwen2)
    tokens, mask = _batch(seed=5, B=2, T=8)
    full = np.array(sequence_logps(model, tokens, mask))
    model.set_dtype(mx.bfloat16)
    for chunk in (None, 4):
        out = sequence_logps(model, tokens, mask, chunk)
        assert out.dtype == mx.float32
        np.testing.assert_allclose(np.array(out), full, rtol=2e-2)


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_other_toy_families_split_exactly(tmp_path, tiny_llama, family):
    from toy import build_model

    path = build_model(tmp_path / family, family=family, seed=6, tokenizer_dir=tiny_llama)
    model = _load(path)
    assert can_split(model)
    tokens, mask = _batch(seed=6, B=2, T=9)
    logits = lm_head(model)(hidden_states(model, tokens))
    np.testing.assert_allclose(np.array(logits), np.array(model(tokens)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.array(sequence_logps(model, tokens, mask, 2)),
        _reference(model, tokens, mask),
        rtol=1e-6,
        atol=2e-5,
    )
