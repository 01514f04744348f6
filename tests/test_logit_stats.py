"""TRL's logits/chosen, logits/rejected and entropy: values on a known batch, and in metrics.jsonl."""

import json

from mlx_kto.data.packing import pack_passes
from mlx_kto.model.logit_stats import logit_stats, packed_logit_stats
from mlx_kto.runtime.streams import cpu_row_parallel

import mlx.core as mx
import numpy as np
import pytest


def test_logit_stats_match_numpy(lora_model):
    model, _ = lora_model
    rng = np.random.default_rng(0)
    B, T = 6, 12  # 6 rows: more than one chunk of ROWS_PER_CHUNK
    tokens = mx.array(rng.integers(3, 60, size=(B, T)).astype(np.int32))
    mask = np.zeros((B, T), dtype=bool)
    for b in range(B):
        mask[b, 4 + b % 3 : T - b % 2] = True
    labels = np.array([True, False, True, True, False, False])
    got = logit_stats(model, tokens, mx.array(mask), mx.array(labels))

    z = np.array(model(tokens[:, :-1]).astype(mx.float32)).astype(np.float64)  # [B, T-1, V]
    w = mask[:, 1:]
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)  # [B, T-1]
    mean_z = z.mean(-1)
    want_c = mean_z[labels][w[labels]].mean()
    want_r = mean_z[~labels][w[~labels]].mean()
    assert got["logits/chosen"] == pytest.approx(want_c, rel=1e-4, abs=1e-5)
    assert got["logits/rejected"] == pytest.approx(want_r, rel=1e-4, abs=1e-5)
    assert got["entropy"] == pytest.approx(ent[w].mean(), rel=1e-4)
    assert 0 < got["entropy"] <= np.log(z.shape[-1]) + 1e-6


def test_absent_side_is_left_out(lora_model):
    model, _ = lora_model
    tokens = mx.array(np.arange(3, 19, dtype=np.int32).reshape(2, 8))
    mask = mx.array(np.arange(8)[None, :].repeat(2, 0) >= 4)
    got = logit_stats(model, tokens, mask, mx.array([True, True]))
    assert "logits/rejected" not in got and "logits/chosen" in got and "entropy" in got


def test_kto_metrics_jsonl_has_trl_logit_keys(tiny_llama, tmp_path):
    from mlx_kto.config.core import make_config
    from mlx_kto.train.run import train

    data = tmp_path / "fb.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            row = {"prompt": f"Q{i}?", "completion": [" yes", " no"][i % 2], "label": i % 2 == 0}
            f.write(json.dumps(row) + "\n")
    cfg = make_config(
        None, model=str(tiny_llama), data=str(data), adapter_path=str(tmp_path / "out"),
        batch_size=4, iters=4, steps_per_report=2, steps_per_eval=0, steps_per_save=0,
        max_length=32, quiet=True,
    )  # fmt: skip
    res = train(cfg, log=lambda *_: None)
    lines = [json.loads(x) for x in res.metrics_path.read_text().splitlines()]
    for r in lines:
        reported = r["step"] % 2 == 0
        for k in ("logits/chosen", "logits/rejected", "entropy"):
            assert (k in r) == reported, (k, r["step"])
        assert r["num_tokens"] > 0
    assert lines[-1]["entropy"] > 0


def test_position_chunks_give_the_same_stats(lora_model, monkeypatch):
    """Large vocabularies go through the head a few positions at a time: same numbers."""
    import mlx_kto.model.logit_stats as ls

    model, _ = lora_model
    rng = np.random.default_rng(1)
    tokens = mx.array(rng.integers(3, 60, size=(3, 40)).astype(np.int32))
    mask = mx.array(np.arange(40)[None, :].repeat(3, 0) >= 10)
    labels = mx.array([True, False, True])
    whole = logit_stats(model, tokens, mask, labels)
    monkeypatch.setattr(ls, "default_chunk_size", lambda b, v: 7)
    chunked = logit_stats(model, tokens, mask, labels)
    for k in whole:
        assert chunked[k] == pytest.approx(whole[k], rel=1e-5)


@pytest.mark.parametrize("budget,streams", [(0, 1), (0, 2), (40, 2), (25, 1)])
def test_packed_stats_equal_the_padded_ones(lora_model, monkeypatch, budget, streams):
    """A packed micro-batch's stats (in passes, pieces on the row streams, the head in chunks
    of positions) are the padded forward's."""
    import mlx_kto.model.logit_stats as ls

    model, _ = lora_model
    rng = np.random.default_rng(2)
    lengths, starts = [12, 30, 7, 22, 16, 9], [4, 10, 1, 8, 15, 3]
    seqs = [rng.integers(3, 60, size=n).tolist() for n in lengths]
    T = max(lengths)
    tokens = np.zeros((len(seqs), T), dtype=np.int32)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, (s, st) in enumerate(zip(seqs, starts)):
        tokens[b, : len(s)] = s
        mask[b, st : len(s)] = True
    labels = mx.array([True, False, False, True, True, False])
    want = logit_stats(model, mx.array(tokens), mx.array(mask), labels)
    monkeypatch.setattr(ls, "default_chunk_size", lambda b, v: 5)  # several head chunks
    passes = pack_passes(seqs, starts, pad_multiple=8, groups=streams, budget=budget)
    assert (len(passes) > 1) == (budget > 0)
    with cpu_row_parallel(streams):
        got = packed_logit_stats(model, [[p.arrays() for p in ps] for ps in passes], labels)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
