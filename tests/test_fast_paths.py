"""The performance paths give the same numbers as the plain ones: the analytic LM-head
backward (for_grad), skipping prompt positions in the head (head_start), rows spread over CPU
streams (cpu_row_parallel), the compiled forward-only log-probs, and the compiled train step."""

import os
import random

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import HEAD_ALIGN, make_batch
from mlx_kto.data.tokenize import Row, assign_kl_partners
from mlx_kto.model.load import apply_lora, load_base, reference_mode
from mlx_kto.model.logprobs import (
    compiled_sequence_logps,
    head_start_of,
    sequence_logps,
    token_logps,
)
from mlx_kto.runtime import streams as rs
from mlx_kto.runtime.streams import cpu_row_parallel

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten


def _rows(n=6, seed=0, vocab=500):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(18, 30))]
        completion = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 12))]
        rows.append(Row(prompt, completion, label=i % 2 == 0))
    assign_kl_partners(rows, seed=seed, max_length=64)
    return rows


def _grads(model, fn):
    value, grads = nn.value_and_grad(model, lambda m: fn(m).sum())(model)
    return float(value), dict(tree_flatten(grads))


def _close_grads(a, b, rtol=1e-4):
    assert set(a) == set(b)
    for k in a:
        scale = float(mx.abs(b[k]).max()) + 1e-12
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=rtol, atol=1e-5 * scale)


def test_make_batch_head_start():
    rows = _rows()
    batch = make_batch(rows, [0, 1, 2, 3])
    first = min(len(rows[i].prompt_ids) for i in [0, 1, 2, 3]) - 1
    assert batch.head_start % HEAD_ALIGN == 0 and batch.head_start <= first
    assert batch.head_start > first - HEAD_ALIGN
    m = np.array(batch.mask)[:, 1:]
    assert not m[:, : batch.head_start].any() and m[:, first].any()
    assert head_start_of(batch.mask) == batch.head_start


def test_for_grad_and_head_start_same_values_and_gradients(lora_model):
    model, _ = lora_model
    batch = make_batch(_rows(), [0, 1, 2, 3, 4])
    assert batch.head_start > 0
    plain = token_logps(model, batch.tokens, batch.mask)
    for kw in ({"for_grad": True}, {"head_start": batch.head_start}):
        out = token_logps(model, batch.tokens, batch.mask, **kw)
        np.testing.assert_allclose(np.array(out), np.array(plain), rtol=1e-6, atol=1e-6)
    v0, g0 = _grads(model, lambda m: sequence_logps(m, batch.tokens, batch.mask))
    for kw in (
        {"for_grad": True},
        {"for_grad": True, "head_start": batch.head_start},
        {"head_start": batch.head_start, "chunk_size": 5},
    ):
        v, g = _grads(model, lambda m, kw=kw: sequence_logps(m, batch.tokens, batch.mask, **kw))
        assert v == pytest.approx(v0, rel=1e-6)
        _close_grads(g, g0)


def test_cpu_row_parallel_same_results_and_restores(lora_model):
    model, _ = lora_model
    batch = make_batch(_rows(), [0, 1, 2, 3, 4])
    v0, g0 = _grads(model, lambda m: sequence_logps(m, batch.tokens, batch.mask, for_grad=True))
    blas_before = rs.blas_threads(None)
    state = [model.state]
    with cpu_row_parallel(2) as n:
        assert n == 2 and len(rs._STREAMS) == 2
        assert rs.row_groups(5) == [(0, 2), (2, 5)]
        if blas_before is not None:
            assert rs.blas_threads(None) == max(1, (os.cpu_count() or 1) // 2)
        with cpu_row_parallel(2) as again:  # nested: a no-op
            assert again == 2
        vg = nn.value_and_grad(
            model, lambda m, t, k: sequence_logps(m, t, k, for_grad=True, head_start=16).sum()
        )
        step = mx.compile(lambda t, k: vg(model, t, k), inputs=state, outputs=state)
        for fn in (
            lambda: vg(model, batch.tokens, batch.mask),
            lambda: step(batch.tokens, batch.mask),
        ):
            v, g = fn()
            assert float(v) == pytest.approx(v0, rel=1e-6)
            _close_grads(dict(tree_flatten(g)), g0)
        made = list(rs._STREAMS)
    assert rs._STREAMS == [] and rs.blas_threads(None) == blas_before
    with cpu_row_parallel(2):  # streams are made once per thread and reused
        assert rs._STREAMS == made


def test_compiled_sequence_logps_modes(lora_model):
    model, _ = lora_model
    batch = make_batch(_rows(), [0, 1, 2, 3], pad_multiple=1)  # T not a multiple of 16
    train_fn = compiled_sequence_logps(model)
    want = sequence_logps(model, batch.tokens, batch.mask)
    np.testing.assert_allclose(
        np.array(train_fn(batch.tokens, batch.mask)), np.array(want), rtol=1e-6, atol=1e-5
    )
    with reference_mode(model):
        ref_fn = compiled_sequence_logps(model)
        ref = ref_fn(batch.tokens, batch.mask)
        want_ref = sequence_logps(model, batch.tokens, batch.mask)
        assert float(mx.abs(want_ref - want).max()) > 1e-3  # the adapter is really off
    np.testing.assert_allclose(np.array(ref), np.array(want_ref), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "compile_, streams, fast, grouped",
    [
        (True, 1, False, True),
        (True, 2, False, True),
        (True, 2, False, False),
        (False, 2, False, True),
        (True, 2, True, True),
        (True, 3, True, True),
    ],
    ids=[
        "compiled-step",
        "streams-grouped-step",
        "streams-eager-step",
        "uncompiled-streams",
        "streams-fastops",
        "three-uneven-groups",
    ],
)
def test_train_step_paths_match_plain_eager(
    tiny_llama, compile_, streams, fast, grouped, monkeypatch
):
    """Two optimizer steps through make_train_step from the same start, plain eager (one
    stream, no fast ops) against: the compiled step (one stream), the step on CPU streams
    (a compiled forward + backward per row group, gradients summed; or, with
    MLX_KTO_GROUPED_STEP=0, the eager step; KL forward compiled), and those with fastops'
    arithmetic exp (3 streams over 4 rows: groups of 1, 2, 1): same losses, same adapter."""
    from mlx_kto.reference.scorer import ReferenceScorer
    from mlx_kto.runtime import fastops
    from mlx_kto.train import loop as trainer
    from mlx_kto.train.loop import make_train_step

    rows = _rows(8, seed=1)
    out = {}
    for variant in ("plain", "tested"):
        c, n, f = (False, 1, False) if variant == "plain" else (compile_, streams, fast)
        cfg = KTOConfig(model=str(tiny_llama), lora_rank=4, seed=0, compile=c).validate()
        model, _, _, _ = load_base(cfg)
        apply_lora(model, cfg)
        opt = optim.AdamW(learning_rate=1e-2)
        opt.init(model.trainable_parameters())
        model.train()
        scorer = ReferenceScorer(model, compile=c)
        monkeypatch.setenv("MLX_KTO_GROUPED_STEP", "1" if grouped or variant == "plain" else "0")
        step = make_train_step(model, opt, cfg, 1.0)
        runs = trainer.grouped_steps_run
        losses = []
        with cpu_row_parallel(n), fastops.fast_ops(model, enable=f):
            for idx in ([0, 1, 2, 3], [4, 5, 6, 7]):
                loss, metrics, grad, norm = step(make_batch(rows, idx), scorer, None, True)
                mx.eval(loss, metrics, model.parameters(), opt.state)
                losses.append(float(loss))
        if variant == "tested":  # the path under test really ran
            assert trainer.grouped_steps_run - runs == (
                2 if grouped and compile_ and streams > 1 else 0
            )
        out[variant] = losses, dict(tree_flatten(model.trainable_parameters()))
    assert out["tested"][0] == pytest.approx(out["plain"][0], rel=1e-5)
    # AdamW turns float32 noise in small gradients into parameter noise of a fraction of lr
    # (1e-2); a wrong gradient moves parameters by ~lr.
    for k, v in out["plain"][1].items():
        np.testing.assert_allclose(np.array(out["tested"][1][k]), np.array(v), rtol=0, atol=1e-4)
    assert max(float(mx.abs(v).max()) for k, v in out["plain"][1].items() if "lora_b" in k) > 5e-3


def test_quantized_model_on_cpu_runs_rows_on_one_stream(tiny_llama, monkeypatch):
    """Each row stream would dequantize every weight for itself (twice the work and the
    dequantized copies): a model whose layers dequantize per call gets one stream, unless
    $MLX_KTO_CPU_STREAMS asks; a float model keeps one stream per core."""
    from mlx_kto.runtime.qmatmul import dequantizes_per_call
    from mlx_kto.train.loop import fast_paths

    monkeypatch.delenv("MLX_KTO_CPU_STREAMS", raising=False)
    if mx.default_device() != mx.cpu or rs.default_streams() < 2:
        pytest.skip("needs the CPU device with 2+ cores")
    plain, _, _, _ = load_base(KTOConfig(model=str(tiny_llama)).validate())
    quant, _, _, _ = load_base(KTOConfig(model=str(tiny_llama), quantize=4, q_group_size=32))
    assert not dequantizes_per_call(plain) and dequantizes_per_call(quant)
    with fast_paths(plain):
        assert rs.active_streams() == rs.default_streams()
    with fast_paths(quant):
        assert rs.active_streams() == 0  # rows one after another, BLAS on every core
    monkeypatch.setenv("MLX_KTO_CPU_STREAMS", "2")
    with fast_paths(quant):
        assert rs.active_streams() == 2
