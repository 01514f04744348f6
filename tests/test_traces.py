"""runtime/traces.py: compiled functions that keep at most `keep` traces."""

import gc

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import make_batch
from mlx_kto.model.load import apply_lora, load_base
from mlx_kto.runtime import fastops, traces
from mlx_kto.runtime.fastpaths import CHECKPOINT_TRACES_MB, checkpoint_paths, fast_paths
from mlx_kto.train.loop import make_step_fns

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from toy import build_model, mixed_rows

KB256 = traces.MIN_TRACE


@pytest.fixture
def unmeasured(monkeypatch):
    """Heap not measurable: each trace counts as an eighth of the budget (at least 256 KB)."""
    monkeypatch.setattr(traces.heap, "in_use", lambda: None)


def _maker(made: list):
    """A `make` whose every function holds its own 4 MB array (freed with the function)."""

    def make():
        own = mx.ones((1 << 20,), dtype=mx.float32)  # [1M] float32: 4 MB
        mx.eval(own)
        made.append(1)
        return mx.compile(lambda x, n: (x * 2 + own[: x.shape[0]]).sum() + n)

    return make


def test_one_trace_per_signature_and_the_least_recently_used_dropped(unmeasured):
    made = []
    fn = traces.bounded(_maker(made), budget=2 * KB256)  # room for two
    a, b, c = mx.ones((3,)), mx.ones((4,)), mx.ones((5,))
    assert fn(a, 1).item() == 10.0
    assert fn(a, 1).item() == 10.0  # same shape, same constant: the same trace
    assert (fn.traced, fn.dropped) == (1, 0)
    fn(a, 2)  # a Python scalar is a constant of the trace: a new one
    fn(a, 1)  # now the most recent
    fn(b, 1)  # full: (a, 2) is the least recently used
    assert (fn.traced, fn.dropped, len(made)) == (3, 1, 3)
    fn(a, 1)  # still kept
    assert fn.traced == 3
    fn(a, 2)  # dropped before: traced again
    fn(c, 1)
    assert (fn.traced, fn.dropped) == (5, 3)
    assert len(fn.fns) == 2


def test_dropped_functions_free_what_they_hold(unmeasured):
    """A dropped compiled function is released (MLX erases its traces with it): memory held
    by 10 shapes' functions stays that of `keep` of them."""
    gc.collect()
    before = mx.get_active_memory()
    fn = traces.bounded(_maker([]), budget=2 * KB256)
    for n in range(1, 11):
        mx.eval(fn(mx.ones((n,)), 0))
    gc.collect()
    held = mx.get_active_memory() - before
    assert 2 * 4 << 20 <= held < 3 * 4 << 20
    del fn
    gc.collect()
    assert mx.get_active_memory() - before < 4 << 20


def test_budget_zero_is_unbounded_and_the_switch_sets_the_budget(monkeypatch):
    fn = traces.bounded(_maker([]), budget=0)
    for n in range(1, 13):
        fn(mx.ones((n,)), 0)
    assert (fn.traced, fn.dropped, len(fn.fns)) == (12, 0, 12)
    monkeypatch.setenv("MLX_KTO_TRACES", "3")
    assert traces.bounded(_maker([])).budget == 3 << 20
    monkeypatch.setenv("MLX_KTO_TRACES", "many")
    assert traces.bounded(_maker([])).budget == traces.BUDGET_MB << 20


def test_a_checkpointed_run_keeps_fewer_traces_and_smaller_passes(monkeypatch, unmeasured):
    """--grad-checkpoint: CHECKPOINT_TRACES_MB per function inside the run's fast paths, read
    when a function traces (functions are made before the run enters them); the switch still
    decides where set; passes of 512 tokens unless --pass-tokens is given."""
    monkeypatch.delenv("MLX_KTO_TRACES", raising=False)
    cfg = KTOConfig(grad_checkpoint=True)
    opts = checkpoint_paths(cfg)
    assert opts["traces_mb"] == CHECKPOINT_TRACES_MB < traces.BUDGET_MB
    assert checkpoint_paths(KTOConfig()) == {}
    fn = traces.bounded(_maker([]))
    assert fn.budget == traces.BUDGET_MB << 20
    with fast_paths(nn.Linear(2, 2), **opts):
        assert fn.budget == CHECKPOINT_TRACES_MB << 20
        for n in range(1, 21):  # each counts as an eighth of the budget: 8 kept
            fn(mx.ones((n,)), 0)
        assert len(fn.fns) == 8 and fn.held <= CHECKPOINT_TRACES_MB << 20
        monkeypatch.setenv("MLX_KTO_TRACES", "1")
        assert fn.budget == 1 << 20
    monkeypatch.delenv("MLX_KTO_TRACES")
    assert fn.budget == traces.BUDGET_MB << 20
    assert (cfg.pass_budget, KTOConfig().pass_budget) == (512, 1024)
    assert KTOConfig(grad_checkpoint=True, pass_tokens=0).pass_budget == 0
    assert KTOConfig(pass_tokens=300).pass_budget == 300


@pytest.mark.skipif(traces.heap.in_use() is None, reason="the heap is measured through glibc")
def test_traces_are_measured_and_kept_within_the_budget():
    """A trace of a 3000-op graph holds a few MB of heap: measured, and no more of them kept
    than the budget holds."""

    def make():
        def chain(x):
            for _ in range(1000):
                x = mx.sin(x) * 1.0001 + 0.5
            return x

        return mx.compile(chain)

    fn = traces.bounded(make, budget=8 << 20)
    for n in range(1, 9):
        mx.eval(fn(mx.ones((n,))))
    sizes = [size for _, size in fn.fns.values()]
    assert all(size > 1 << 20 for size in sizes)  # ~3000 graph nodes each
    assert fn.held == sum(sizes) <= 8 << 20
    assert fn.dropped == 8 - len(sizes) > 0


def test_mode_and_stream_are_part_of_the_key(monkeypatch):
    fn = traces.bounded(_maker([]))
    x = mx.ones((3,))
    fn(x, 0)
    monkeypatch.setattr(fastops, "_ACTIVE", [True])  # inside `fast_ops`: ops differ
    fn(x, 0)
    monkeypatch.setattr(fastops, "_ACTIVE", [False])
    with mx.stream(mx.new_stream(mx.cpu)):
        fn(x, 0)
    fn(x, 0)
    assert fn.traced == 3


@pytest.mark.parametrize(
    "tree, other",
    [
        ({"a": mx.zeros((2, 3))}, {"a": mx.zeros((3, 2))}),
        ([mx.zeros((2,))], (mx.zeros((2,)),)),
        (mx.zeros((2,), dtype=mx.int32), mx.zeros((2,), dtype=mx.float32)),
        ([1, None], [1, 2]),
    ],
)
def test_signature_tells_apart_what_mlx_retraces_on(tree, other):
    assert traces.signature(tree) != traces.signature(other)
    assert traces.signature(tree) == traces.signature(tree)


def test_a_step_traced_again_after_its_trace_was_dropped_computes_the_same(monkeypatch, tmp_path):
    """With room for one trace per function, a packed step's KL forward and gradient pass
    drop a shape's trace for the next one, trace it again when it comes back, and compute
    what they computed the first time."""
    made = []
    real = traces.bounded
    monkeypatch.setattr(traces, "bounded", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    monkeypatch.setenv("MLX_KTO_TRACES", "0.01")  # 10 KB: one trace kept per function
    path = build_model(tmp_path / "llama", family="llama", seed=0)
    cfg = KTOConfig(model=str(path), lora_rank=4, seed=0).validate()
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    model.train()
    opt = optim.AdamW(learning_rate=1e-3)
    opt.init(model.trainable_parameters())
    fns = make_step_fns(model, opt, cfg, 1.0)
    batches = [make_batch(mixed_rows(8, seed), list(range(8)), packing=True) for seed in (1, 2, 1)]
    out = []
    with fast_paths(model):
        for batch in batches:
            kl = fns.kl_forward(model, batch)
            ref = mx.zeros_like(kl)
            loss, _, grad, _ = fns.grad_step(batch, ref, mx.array(0.1), mx.array(1.0), None, False)
            mx.eval(kl, loss, grad)
            out.append((np.array(kl), float(loss), dict(tree_flatten(grad))))
    assert made and all(b.budget == int(0.01 * (1 << 20)) for b in made)
    used = [b for b in made if b.traced]
    assert len(used) >= 2 and all(b.dropped > 0 and len(b.fns) == 1 for b in used)
    (kl1, loss1, grad1), (kl2, _, _), (kl3, loss3, grad3) = out
    assert not np.allclose(kl1, kl2)  # the second batch is another one
    np.testing.assert_allclose(kl3, kl1, rtol=1e-6, atol=1e-6)
    assert loss3 == pytest.approx(loss1, rel=1e-6)
    for k in grad1:
        np.testing.assert_allclose(np.array(grad3[k]), np.array(grad1[k]), rtol=1e-5, atol=1e-7)
