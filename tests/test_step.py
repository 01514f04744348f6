"""The KL reference point over the whole optimizer step: micro-batch 1 x accumulation 8 is the
same update as one micro-batch of 8 (gradients and adapters), with the reference cache cold and
warm; the split of global batches; the config rules for micro-batch 1."""

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.data.batches import batch_order, make_batch
from mlx_kto.errors import UserError
from mlx_kto.model.load import apply_lora, load_base
from mlx_kto.reference.cache import RefCache
from mlx_kto.reference.fingerprint import reference_fingerprint
from mlx_kto.reference.scorer import ReferenceScorer
from mlx_kto.train.distributed import Dist
from mlx_kto.train.loop import fast_paths, make_step_fns
from mlx_kto.train.run import train
from mlx_kto.train.step import StepData, iterate_steps, run_step, split_global_batch

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from feedback_fixtures import write_feedback
from mlx.utils import tree_flatten, tree_unflatten
from toy import mixed_rows


def _rows(n=8, seed=0, vocab=500):
    return mixed_rows(n, seed, vocab, (6, 20), (3, 12), undesirable=0, max_length=64)


@pytest.fixture(scope="module")
def setup(tiny_llama):
    """(model, cfg kwargs, start weights): the tiny Llama with LoRA whose lora_b is non-zero,
    so every LoRA matrix gets a gradient, and a KL log-ratio clearly above 0 (z is not clamped)."""
    base = dict(model=str(tiny_llama), lora_rank=4, seed=0, max_grad_norm=0.0)
    cfg = KTOConfig(**base).validate()
    model, _, path, _ = load_base(cfg)
    mx.random.seed(0)
    apply_lora(model, cfg)
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.2
    model.train()
    start = dict(tree_flatten(model.trainable_parameters()))
    mx.eval(start)
    return model, base, path, start


def _one_step(setup, micro, accum, scorer, kl_estimate="step"):
    """One optimizer step over rows 0..7 split as micro x accum; SGD with lr 1, so the
    parameter change is exactly minus the gradient. Returns (gradient, metrics, norm)."""
    model, base, _, start = setup
    model.update(tree_unflatten(list(start.items())))
    cfg = KTOConfig(
        **base, batch_size=micro, grad_accumulation_steps=accum, kl_estimate=kl_estimate
    ).validate()
    rows = _rows()
    shards = split_global_batch(list(range(8)), 1, micro)
    data = StepData(0, 0, shards, [make_batch(rows, idx) for idx in shards[0]])
    opt = optim.SGD(learning_rate=1.0)
    opt.init(model.trainable_parameters())
    fns = make_step_fns(model, opt, cfg, 1.0)
    with fast_paths(model):
        metrics, norm, ntoks = run_step(data, scorer, fns, model, opt, cfg, Dist(), True)
    assert ntoks == sum(len(r.tokens) for r in rows)
    after = dict(tree_flatten(model.trainable_parameters()))
    return {k: start[k] - after[k] for k in start}, metrics, norm


def _assert_same_grads(a, b):
    for k in a:
        scale = float(mx.abs(b[k]).max())
        assert scale > 0, k
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-5 * scale)


def test_micro_batch_1_x_8_equals_one_batch_of_8_cold_and_warm(setup, tmp_path):
    model, _, path, _ = setup

    def scorer(folder):
        cache = RefCache(tmp_path / folder)
        return ReferenceScorer(model, cache=cache, fingerprint=reference_fingerprint(path))

    one = scorer("a")  # cold: fills cache a
    g8, m8, n8 = _one_step(setup, 8, 1, one)
    assert one.forwards == 1 and one.hits == 0
    cold = scorer("b")  # cold, computed in eight 1-row forwards
    g1, m1, n1 = _one_step(setup, 1, 8, cold)
    assert cold.forwards == 8 and cold.hits == 0
    warm = scorer("a")  # warm: every value from the cache written by the batch of 8
    gw, mw, nw = _one_step(setup, 1, 8, warm)
    assert warm.forwards == 0 and warm.hits == 16
    assert m8["kl"] > 0.1  # z is really used, not clamped to 0
    for g, m, n in ((g1, m1, n1), (gw, mw, nw)):
        _assert_same_grads(g, g8)
        assert n == pytest.approx(n8, rel=1e-5)
        for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert m[key] == pytest.approx(m8[key], rel=1e-5, abs=1e-6), key
        assert m["count/chosen"] == m8["count/chosen"] == 5


def test_per_micro_batch_estimate_differs(setup):
    """The control: z of each 1-row micro-batch on its own (kl_estimate micro_batch, allowed
    with 2-row micro-batches) gives another gradient, so the test above can fail."""
    model = setup[0]
    g8, _, _ = _one_step(setup, 8, 1, ReferenceScorer(model))
    g2, _, _ = _one_step(setup, 2, 4, ReferenceScorer(model), kl_estimate="micro_batch")
    gs, _, _ = _one_step(setup, 2, 4, ReferenceScorer(model), kl_estimate="step")
    _assert_same_grads(gs, g8)
    diff = max(float(mx.abs(g2[k] - g8[k]).max() / mx.abs(g8[k]).max()) for k in g8)
    assert diff > 1e-2


@pytest.mark.parametrize("cache", ["cold", "warm"])
def test_trained_adapter_same_for_1x8_and_8x1(tiny_llama, tmp_path, cache):
    """Three AdamW steps of train(): micro-batch 1 x 8 gives the adapter of micro-batch 8 x 1
    (the data order is one of global batches, so both read the same rows per step)."""
    data = tmp_path / "train.jsonl"
    write_feedback(data, 48, seed=0, numbered=True)

    def run(name, micro, accum, ref_cache):
        cfg = make_config(
            None,
            model=str(tiny_llama),
            data=str(data),
            adapter_path=str(tmp_path / name),
            batch_size=micro,
            grad_accumulation_steps=accum,
            iters=3,
            learning_rate=1e-3,
            warmup_steps=0,
            lora_rank=4,
            steps_per_eval=0,
            steps_per_save=0,
            max_length=64,
            quiet=True,
            ref_cache=str(tmp_path / ref_cache),
        )
        res = train(cfg, log=lambda *_: None)
        return res, mx.load(str(res.adapter_path / "adapters.safetensors"))

    r8, a8 = run("b8", 8, 1, "cache8")
    r1, a1 = run("b1", 1, 8, "cache8" if cache == "warm" else "cache1")
    # Cold: one forward per 1-row micro-batch (24 rows in 3 steps); warm: none.
    assert r1.reference["ref_forwards"] == (0 if cache == "warm" else 24)
    moved = max(float(mx.abs(v).max()) for k, v in a8.items() if "lora_b" in k)
    assert moved > 1e-3  # lora_b started at 0: the adapter really moved
    for k in a8:
        np.testing.assert_allclose(np.array(a1[k]), np.array(a8[k]), rtol=0, atol=2e-5)
    assert r1.final_metrics["loss"] == pytest.approx(r8.final_metrics["loss"], rel=1e-5)
    assert r1.final_metrics["tokens"] == r8.final_metrics["tokens"]


def test_split_global_batch():
    assert split_global_batch(list(range(8)), 2, 3) == [[[0, 1, 2], [3]], [[4, 5, 6], [7]]]
    assert split_global_batch(list(range(3)), 2, 1) == [[[0], [1]], [[2]]]
    assert split_global_batch([5], 2, 4) == [[[5]], []]  # a rank may get no rows
    # Steps read the same rows however they are split (micro-batch x accumulation x ranks).
    rows = _rows(40)

    def step_rows(micro, accum, world, rank):
        cfg = KTOConfig(batch_size=micro, grad_accumulation_steps=accum, seed=3)
        it = iterate_steps(rows, cfg, Dist(rank=rank, size=world), with_kl=False)
        return [[i for b in next(it).batches for i in b.index] for _ in range(7)]

    want = step_rows(8, 1, 1, 0)
    assert [sorted(s) for s in step_rows(1, 8, 1, 0)] == [sorted(s) for s in want]
    halves = zip(step_rows(2, 2, 2, 0), step_rows(2, 2, 2, 1))
    assert [sorted(a + b) for a, b in halves] == [sorted(s) for s in want]
    assert batch_order(rows, 8, seed=3, epoch=0)[:5] == want[:5]  # accumulation 1: as before


def test_micro_batch_one_config_rules():
    ok = make_config(None, model="m", data="d", batch_size=1, grad_accumulation_steps=2)
    assert ok.kl_estimate == "step" and ok.rows_per_step() == 2
    with pytest.raises(UserError, match="at least 2 rows per optimizer step"):
        make_config(None, model="m", data="d", batch_size=1)
    with pytest.raises(UserError, match="micro_batch"):
        make_config(
            None, model="m", data="d", batch_size=1, grad_accumulation_steps=4,
            kl_estimate="micro_batch",
        )  # fmt: skip
    with pytest.raises(UserError, match="kl_estimate"):
        make_config(None, model="m", data="d", kl_estimate="batch")
