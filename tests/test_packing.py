"""Packed (padding-free) micro-batches give the padded path's numbers: per-row log-probs,
the KTO loss and its gradient, the reference log-probs (cached or not), for every
architecture that packs, with the CPU fast paths (row streams, fastops' attention) on and off;
and a packed run trains the unpacked run's adapter."""

import json
import random
import subprocess
import sys

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig
from mlx_kto.data.batches import make_batch
from mlx_kto.data.packing import (
    first_fit_decreasing,
    pack_passes,
    pack_rows_of,
    pack_sequences,
    plan_packs,
    plan_passes,
    split_passes,
)
from mlx_kto.data.tokenize import Row, assign_kl_partners
from mlx_kto.model.load import apply_lora, load_base
from mlx_kto.model.logprobs import compiled_sequence_logps, sequence_logps
from mlx_kto.model.packed import (
    SegmentCache,
    can_pack,
    compiled_packed_logps,
    pack_windows,
    packed_sequence_logps,
)
from mlx_kto.reference.fingerprint import Fingerprint
from mlx_kto.reference.scorer import RefCache, ReferenceScorer
from mlx_kto.runtime import fastops
from mlx_kto.runtime.fastpaths import fast_paths
from mlx_kto.runtime.streams import cpu_row_parallel
from mlx_kto.train.checkpoint import find_checkpoint, read_state
from mlx_kto.train.loop import make_step_fns

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer
from toy import build_model, mixed_rows

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "phi3"]
# (row streams, fastops' arithmetic attention and SwiGLU): the CPU fast paths off and on
PATHS = [(1, False), (2, True)]
PATH_IDS = ["plain", "fast-paths"]


def _padded(seqs, starts):
    T = max(len(s) for s in seqs)
    toks = np.zeros((len(seqs), T), np.int32)  # [B, T]
    mask = np.zeros((len(seqs), T), bool)  # [B, T]
    for i, (s, st) in enumerate(zip(seqs, starts)):
        toks[i, : len(s)] = s
        mask[i, st : len(s)] = True
    return mx.array(toks), mx.array(mask)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """One random-init model per family with rank-4 LoRA (non-zero lora_b), train mode."""
    out = {}
    for i, family in enumerate(FAMILIES):
        path = build_model(tmp_path_factory.mktemp(family), family=family, seed=i)
        cfg = KTOConfig(model=str(path), lora_rank=4, seed=0).validate()
        model, _, _, _ = load_base(cfg)
        apply_lora(model, cfg)
        for _, m in model.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape, key=mx.random.key(1)) * 0.05
        model.train()
        out[family] = (model, cfg)
    return out


def _close_grads(a: dict, b: dict, rel=1e-5):
    assert set(a) == set(b)
    for k in a:
        scale = float(mx.abs(b[k]).max())
        assert scale > 0, k
        assert float(mx.abs(a[k] - b[k]).max()) <= rel * scale, k


# -- the plan and the layout ------------------------------------------------------------------


def test_plan_packs_places_every_sequence_once_within_capacity():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(1, 24)
        lengths = [min(512, max(2, int(rng.lognormvariate(4.5, 0.8)))) for _ in range(n)]
        cap = -(-max(lengths) // 16) * 16  # packs are attention windows of the longest row
        for lines in (1, 2, 3):
            plan = plan_packs(lengths, 16, lines)
            assert len(plan) == min(lines, n)
            assert sorted(i for row in plan for p in row for i in p) == list(range(n))
            assert all(sum(lengths[i] for i in p) <= cap for row in plan for p in row)
            assert all(p == sorted(p) for row in plan for p in row)
            size = [sum(lengths[i] for p in row for i in p) for row in plan]
            assert max(size) - min(size) <= max(lengths)  # rows balanced
            pk = pack_rows_of([[1] * k for k in lengths], [1] * n, groups=lines)
            assert pk.real == sum(lengths) and pk.computed == len(plan) * pk.tokens.shape[1]
            assert pk.tokens.shape[1] == -(-max(size) // 16) * 16
    assert plan_packs([64] * 8, 16) == [[[i] for i in range(8)]]  # full windows: one each
    assert first_fit_decreasing([5, 9, 3, 4], 10) == [[1], [0, 3], [2]]


def test_split_passes_keeps_each_pass_within_budget():
    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 24)
        lengths = [min(512, max(2, int(rng.lognormvariate(5.0, 0.8)))) for _ in range(n)]
        budget = rng.choice([0, 64, 256, 1024, 4096])
        passes = split_passes(lengths, budget)
        assert sorted(i for p in passes for i in p) == list(range(n))  # each once
        assert all(p == sorted(p) for p in passes)
        if budget == 0 or sum(lengths) <= budget:
            assert len(passes) == 1
            continue
        for p in passes:  # within budget, or one sequence longer than the budget alone
            assert sum(lengths[i] for i in p) <= budget or len(p) == 1
        short = [n for n in lengths if n <= budget]
        assert len(passes) >= len(lengths) - len(short) + -(-sum(short) // budget)
    assert split_passes([500, 500, 10, 10], 512) == [[0, 2], [1, 3]]  # balanced, not first-fit
    assert split_passes([900, 100, 100], 512) == [[0], [1, 2]]  # too long: alone


def test_plan_passes_balances_the_streams_within_the_budget():
    rng = random.Random(3)
    for _ in range(300):
        n = rng.randint(1, 24)
        lengths = [min(512, max(2, int(rng.lognormvariate(5.0, 0.8)))) for _ in range(n)]
        budget = rng.choice([0, 64, 256, 1024, 4096])
        groups = rng.choice([1, 2, 3])
        passes = plan_passes(lengths, budget, groups)
        assert sorted(i for p in passes for q in p for i in q) == list(range(n))  # each once
        assert all(q == sorted(q) and q for p in passes for q in p)
        assert all(len(p) <= groups for p in passes)
        for p in passes:  # within budget, or one sequence longer than the budget alone
            assert (
                budget == 0
                or sum(lengths[i] for q in p for i in q) <= budget
                or (len(p) == 1 and len(p[0]) == 1)
            )
        if budget == 0:
            assert len(passes) == 1
        if groups == 2 and budget in (0, 4096) and n > 1 and sum(lengths) <= budget // 2:
            # one pass: two pieces, the streams' totals one sequence apart at most
            (p,) = passes
            size = [sum(lengths[i] for i in q) for q in p]
            assert len(p) == 2 and abs(size[0] - size[1]) <= max(lengths)
    # each stream's share first, then cut: passes pair pieces of near-equal length
    assert plan_passes([500, 480, 300, 290, 200, 190], 1024, 2) == [[[0], [2, 4]], [[3, 5], [1]]]
    # pieces that together exceed the budget (longer than budget / groups) run apart
    assert plan_passes([40, 30, 20, 10], 50, 2) == [[[0]], [[1]], [[3], [2]]]
    assert plan_passes([40, 30, 20, 10], 50, 1) == [[[0, 3]], [[1, 2]]]
    # a pass's targets keep their index in the micro-batch: other rows sum to 0 there
    seqs = [[1] * n for n in (40, 30, 20, 10)]
    passes = pack_passes(seqs, [1] * 4, pad_multiple=8, groups=2, budget=100)
    assert [[pk.pack_rows for pk in pieces] for pieces in passes] == [[[[0, 3]], [[1, 2]]]]
    assert [[pk.real for pk in pieces] for pieces in passes] == [[50, 50]]
    passes = pack_passes(seqs, [1] * 4, pad_multiple=8, groups=2, budget=50)
    assert [[pk.real for pk in pieces] for pieces in passes] == [[40], [30], [10, 20]]
    # each piece only as long as its own sequences (rounded to pad_multiple)
    assert [[pk.computed for pk in pieces] for pieces in passes] == [[40], [32], [16, 24]]
    assert all(pk.n_rows == 4 for pieces in passes for pk in pieces)
    assert set(np.array(passes[2][0].tgt_row).ravel().tolist()) == {-1, 3}


def test_packing_leaves_little_padding_on_lognormal_lengths():
    """Micro-batches of 8 with log-normal prompt and completion lengths up to 512 (as real
    feedback): right-padding computes about twice the real tokens, packing a few % more."""
    rng = random.Random(1)
    real = padded = packed = 0
    for _ in range(40):
        lengths = [
            min(512, int(rng.lognormvariate(4.0, 0.8)) + int(rng.lognormvariate(4.5, 0.8)))
            for _ in range(8)
        ]
        pk = pack_rows_of([[1] * n for n in lengths], [1] * 8, groups=2)
        real += sum(lengths)
        padded += 8 * (-(-max(lengths) // 16) * 16)
        packed += pk.computed
    assert packed / real < 1.05 and padded / real > 1.5


def test_pack_layout():
    seqs = [[1, 5, 6, 7], [1, 8, 9], [1, 2, 3, 4, 5, 6], [4, 4]]
    starts = [2, 1, 3, 0]  # the last one has no prompt: its first token is never a target
    pk = pack_sequences(seqs, starts, [[[2], [1]], [[0, 3]]], pad_multiple=4)
    assert pk.tokens.shape == (2, 12) and pk.real == 15 and pk.computed == 24
    assert pk.win_idx.shape == (2, 2, 8)  # 2 rows, at most 2 windows each, windows of 8
    assert pk.pack_rows == [[2, 1], [0, 3]]
    assert np.array(pk.tokens).tolist() == [
        [1, 2, 3, 4, 5, 6, 1, 8, 9, 0, 0, 0],
        [1, 5, 6, 7, 4, 4, 0, 0, 0, 0, 0, 0],
    ]
    assert np.array(pk.positions)[1].tolist() == [0, 1, 2, 3, 0, 1] + [0] * 6
    win_idx, win_seg, inv = (np.array(a) for a in (pk.win_idx, pk.win_seg, pk.inv))
    assert win_idx[0, 1, :3].tolist() == [6, 7, 8] and win_seg[0, 1, :3].tolist() == [1, 1, 1]
    assert win_seg[1, 0, :6].tolist() == [0, 0, 0, 0, 1, 1] and (win_seg[1, 0, 6:] < 0).all()
    assert (win_seg[1, 1] < 0).all()  # row 1 has one window: the second is unused
    for w in win_seg.reshape(-1, 8):  # unused slots: unique in their window
        assert len(set(w[w < 0].tolist())) == int((w < 0).sum())
    for r in range(2):  # every real position's slot points back at it
        for t in range(6 if r else 9):
            w, c = divmod(int(inv[r, t]), 8)
            assert win_idx[r, w, c] == t
    row, pos, ids = (np.array(a) for a in (pk.tgt_row, pk.tgt_pos, pk.tgt_ids))
    got = {(int(r), int(p), int(i)) for r, p, i in zip(row.ravel(), pos.ravel(), ids.ravel())}
    assert {g for g in got if g[0] >= 0} == {
        (2, 2, 4), (2, 3, 5), (2, 4, 6), (1, 6, 8), (1, 7, 9),  # row 0
        (0, 1, 6), (0, 2, 7), (3, 4, 4),  # row 1; sequence 3: only its second token
    }  # fmt: skip


def test_pack_windows_mask_is_block_diagonal_causal():
    pk = pack_sequences([[1, 2, 3], [1, 2], [7]], [1, 1, 0], [[[0, 1, 2]]], pad_multiple=8)
    cache = SegmentCache(pk.positions, pack_windows(pk.arrays()))
    assert cache.make_mask(8) is None and cache.make_mask(8, window_size=4) == 4
    keep = np.array(cache.windows[2])[0, 0]  # [C, C] of the one window
    seg = np.array(pk.win_seg)[0, 0]
    for i in range(8):
        for j in range(8):
            assert keep[i, j] == (seg[i] == seg[j] and j <= i)
    assert keep.any(axis=1).all()  # an unused slot keeps itself: no all-masked row


# -- the same numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("streams, fast", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logps_and_gradients_equal_padded(family_models, family, streams, fast):
    model, _ = family_models[family]
    assert can_pack(model)
    rows = mixed_rows(7, seed=FAMILIES.index(family))
    seqs, starts = [r.tokens for r in rows], [len(r.prompt_ids) for r in rows]
    toks, mask = _padded(seqs, starts)
    pk = pack_rows_of(seqs, starts, groups=2)
    assert len(pk.pack_rows) < len(seqs)  # really packed

    def padded_fn(m):
        return sequence_logps(m, toks, mask, for_grad=True)

    def packed_fn(m):
        return packed_sequence_logps(m, pk.arrays(), pk.n_rows, for_grad=True)

    with cpu_row_parallel(streams), fastops.fast_ops(model, enable=fast):
        want, got = padded_fn(model), packed_fn(model)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
        weights = mx.array(np.linspace(-1.0, 1.0, len(seqs)), dtype=mx.float32)
        grads = {}
        for name, fn in (("padded", padded_fn), ("packed", packed_fn)):
            _, g = nn.value_and_grad(model, lambda m, fn=fn: (fn(m) * weights).sum())(model)
            grads[name] = dict(tree_flatten(g))
        _close_grads(grads["packed"], grads["padded"])
        # the compiled forward-only twins (reference and KL passes)
        c_padded = compiled_sequence_logps(model)(toks, mask)
        c_packed = compiled_packed_logps(model)(pk.arrays(), pk.n_rows)
        np.testing.assert_allclose(np.array(c_packed), np.array(c_padded), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.array(c_packed), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("streams, fast", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("pass_tokens", [0, 100], ids=["one-pass", "passes"])
def test_step_loss_and_gradient_equal_padded(family_models, compile_, streams, fast, pass_tokens):
    """One micro-batch through make_step_fns (reference, KL forward, gradient pass), packed
    (in one pass, or in passes of at most 100 tokens) and padded: same reference and KL
    log-probs per row, same loss, same gradient."""
    model, cfg = family_models["llama"]
    cfg = KTOConfig(**{**cfg.to_dict(), "compile": compile_}).validate()
    rows = mixed_rows(8, seed=3)
    out = {}
    for packing in (False, True):
        batch = make_batch(rows, list(range(8)), packing=packing, pass_tokens=pass_tokens)
        assert (batch.packed is not None and batch.kl_packed is not None) == packing
        if packing:
            assert (len(batch.packed) > 2 and len(batch.kl_packed) > 2) == (pass_tokens > 0)
            sizes = [len(pieces) for pieces in batch.packed]  # a piece per row stream
            assert set(sizes) <= {1, 2} and 2 in sizes
        opt = optim.AdamW(learning_rate=1e-3)
        opt.init(model.trainable_parameters())
        fns = make_step_fns(model, opt, cfg, 1.0)
        scorer = ReferenceScorer(model, compile=compile_, packing=packing, pass_tokens=pass_tokens)
        with fast_paths(model, streams=streams, fast_exp=fast):
            ref, ref_kl = scorer(batch)
            kl = fns.kl_forward(model, batch)
            z = mx.maximum((kl - ref_kl).mean(), 0.0)
            loss, metrics, grad, _ = fns.grad_step(batch, ref, z, mx.array(0.5), None, False)
            mx.eval(loss, metrics, grad)
        assert batch.index == list(range(8))  # rows keep their order; packs hold them
        per_row = {k: np.array(v) for k, v in (("ref", ref), ("kl", kl), ("ref_kl", ref_kl))}
        out[packing] = per_row, float(loss), dict(tree_flatten(grad)), batch.computed
    (want, want_loss, want_grad, padded_computed), (got, loss, grad, packed_computed) = (
        out[False],
        out[True],
    )
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-5)
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    _close_grads(grad, want_grad)
    # each pass rounds its rows up to 16 positions: short passes pad a little more
    assert packed_computed < (0.8 if pass_tokens == 0 else 0.9) * padded_computed


@pytest.mark.parametrize("streams, fast", PATHS, ids=PATH_IDS)
def test_reference_cache_is_shared_between_packed_and_padded(
    family_models, tmp_path, streams, fast
):
    """The reference cache's batched forward packs its misses; the keys are content, so a
    packed scorer reads what a padded one stored, and both store the same values."""
    model, _ = family_models["qwen2"]
    rows = mixed_rows(8, seed=4)
    fp = Fingerprint("ab" * 16)
    scores = {}
    with fast_paths(model, streams=streams, fast_exp=fast):
        for packing in (False, True):
            batch = make_batch(rows, list(range(8)), packing=packing)
            cache = RefCache(tmp_path / f"cache-{packing}")
            scorer = ReferenceScorer(model, cache=cache, fingerprint=fp, packing=packing)
            ref, kl = scorer(batch)  # all misses: one packed (or padded) forward
            assert scorer.hits == 0 and scorer.forwards == 1
            scores[packing] = np.array(ref), np.array(kl)
            uncached = ReferenceScorer(model, packing=packing)(batch)
            for a, b in zip(uncached, (ref, kl)):
                np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
        for a, b in zip(scores[True], scores[False]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        # a packed scorer on the padded scorer's cache: every sequence a hit, no forward
        reader = ReferenceScorer(
            model, cache=RefCache(tmp_path / "cache-False"), fingerprint=fp, packing=True
        )
        reader(make_batch(rows, list(range(8)), packing=True))
        assert reader.forwards == 0 and reader.hits == 16


def test_models_that_cannot_pack_keep_the_padded_path(tmp_path):
    from mlx_kto.train.packed_step import wrap

    path = build_model(tmp_path / "llama", family="llama", seed=0)
    cfg = KTOConfig(model=str(path), lora_rank=4).validate()
    model, _, _, _ = load_base(cfg)
    model.model_type = "gemma"  # a type packing was not checked against
    assert not can_pack(model)
    sentinel = (object(), object())
    assert wrap(model, cfg, {}, None, *sentinel) == sentinel
    assert not ReferenceScorer(model, packing=True).packing


# -- end to end -------------------------------------------------------------------------------


def _write_feedback(path, n=48, seed=0):
    """Rows of mixed lengths: a short or long question, a short or long answer."""
    rng = random.Random(seed)
    words = "the sky sea cat hat story poem answer grass light is blue green and very long".split()
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(words) for _ in range(rng.choice([2, 4, 12, 30])))
            completion = " ".join(rng.choice(words) for _ in range(rng.choice([1, 3, 10, 25])))
            f.write(json.dumps({"prompt": prompt, "completion": completion, "label": i % 2 == 0}))
            f.write("\n")


@pytest.mark.slow
def test_packed_and_padded_runs_train_the_same_adapter(tiny_llama, tmp_path):
    """`python -m mlx_kto.train` for 10 steps with --packing, with --no-packing (the flag
    the config field gives) and packed in passes of at most 64 tokens: the same adapter to
    1e-5."""
    data = tmp_path / "train.jsonl"
    _write_feedback(data)
    # the rows really pack: most micro-batches of 8 save more than 1 - PACK_WORTH
    tok = load_tokenizer(tiny_llama)
    feedback = [json.loads(line) for line in data.read_text().splitlines()]
    rows = [Row(tok.encode(r["prompt"]), tok.encode(r["completion"]), r["label"]) for r in feedback]
    assign_kl_partners(rows, seed=0, max_length=96)
    batches = [make_batch(rows, list(range(i, i + 8)), packing=True) for i in range(0, 48, 8)]
    assert sum(b.packed is not None for b in batches) >= 4
    adapters = {}
    for flag in ("--packing", "--no-packing", "--pass-tokens=64"):
        out = tmp_path / flag.strip("-").replace("=", "")
        args = [
            "--model", str(tiny_llama), "--data", str(data), "--adapter-path", str(out),
            "--batch-size", "8", "--iters", "10", "--learning-rate", "1e-3",
            "--warmup-steps", "0", "--lora-rank", "4", "--steps-per-eval", "0",
            "--steps-per-save", "0", "--max-length", "96", "--quiet", "--no-ref-cache", flag,
        ]  # fmt: skip
        p = subprocess.run(
            [sys.executable, "-m", "mlx_kto.train", *args], capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr[-2000:]
        adapters[flag] = mx.load(str(out / "adapters.safetensors"))
        state = read_state(find_checkpoint(out))
        assert state["config"]["packing"] == (flag != "--no-packing")
        assert state["config"]["pass_tokens"] == (64 if flag == "--pass-tokens=64" else None)
    packed, padded = adapters["--packing"], adapters["--no-packing"]
    for k in padded:  # passes of 64 tokens: several per micro-batch
        np.testing.assert_allclose(
            np.array(adapters["--pass-tokens=64"][k]), np.array(packed[k]), rtol=0, atol=1e-5
        )
    moved = max(float(mx.abs(v).max()) for k, v in padded.items() if "lora_b" in k)
    assert moved > 1e-3  # the adapter really moved
    assert set(packed) == set(padded)
    for k in padded:
        np.testing.assert_allclose(np.array(packed[k]), np.array(padded[k]), rtol=0, atol=1e-5)


def test_passes_and_grad_checkpoint_bound_the_step_memory(tmp_path):
    """`mlx-kto train` on long rows: the step's peak (metrics.jsonl) falls with --pass-tokens,
    and --grad-checkpoint lowers it again (the last pass's gradient is evaluated before the
    update: evaluated together, every checkpointed block's activations stayed alive)."""
    model = build_model(
        tmp_path / "m", family="llama", seed=0, hidden_size=256, intermediate_size=768,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    rng = random.Random(0)
    words = "the sky sea cat hat story poem answer grass light is blue green".split()
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(8):
            prompt = " ".join(rng.choice(words) for _ in range(60))
            completion = " ".join(rng.choice(words) for _ in range(300))
            f.write(json.dumps({"prompt": prompt, "completion": completion, "label": i % 2 == 0}))
            f.write("\n")
    peaks = {}
    for name, extra in (
        ("one pass", ["--pass-tokens", "0"]),
        ("passes", ["--pass-tokens", "600"]),
        ("passes + checkpoint", ["--pass-tokens", "600", "--grad-checkpoint"]),
    ):
        out = tmp_path / name.replace(" ", "_")
        args = [
            "--model", str(model), "--data", str(tmp_path / "train.jsonl"), "--adapter-path",
            str(out), "--batch-size", "8", "--iters", "1", "--lora-rank", "4",
            "--steps-per-eval", "0", "--max-length", "512", "--quiet", "--no-ref-cache", *extra,
        ]  # fmt: skip
        p = subprocess.run(
            [sys.executable, "-m", "mlx_kto.train", *args], capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr[-2000:]
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        peaks[name] = max(m["peak_memory_gb"] for m in metrics if "peak_memory_gb" in m)
    assert peaks["passes"] < 0.6 * peaks["one pass"], peaks
    assert peaks["passes + checkpoint"] < 0.7 * peaks["passes"], peaks
