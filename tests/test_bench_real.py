"""bench/real_h2h.py's pieces that need neither torch nor TRL nor the real model: the seeded
variable-length chat set, the per-epoch split and padding share, and h2h's summary of a
metrics.jsonl with per-step reference misses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import h2h  # noqa: E402
import real_h2h  # noqa: E402


def test_chat_rows_are_seeded_and_fit_the_budget(hf_tokenizer):
    rows = real_h2h.chat_rows(hf_tokenizer, 24, max_tokens=128, seed=3, quick=True)
    assert rows == real_h2h.chat_rows(hf_tokenizer, 24, max_tokens=128, seed=3, quick=True)
    assert rows != real_h2h.chat_rows(hf_tokenizer, 24, max_tokens=128, seed=4, quick=True)

    def n(text):
        return len(hf_tokenizer.encode(text, add_special_tokens=False))

    lp = [n(r["prompt"][0]["content"]) for r in rows]
    lc = [n(r["completion"][0]["content"]) for r in rows]
    budget = 128 - real_h2h.TEMPLATE_TOKENS
    assert all(p + c <= budget for p, c in zip(lp, lc))
    assert len(set(lp)) > 8 and len(set(lc)) > 8  # lengths vary
    assert {r["prompt"][0]["role"] for r in rows} == {"user"}
    assert {r["completion"][0]["role"] for r in rows} == {"assistant"}
    assert 0 < sum(r["label"] for r in rows) < 24


def test_epoch_times_and_padding_share():
    assert real_h2h.epoch_times([2.0, 3.5, 5.0, 8.0], 1.0, 2) == [2.5, 4.5]
    assert real_h2h.epoch_times([2.0, 3.5, 5.0], 1.0, 2) == [2.5]  # a partial epoch: left out
    p = real_h2h.padding({"real": 90, "computed": 120}, ("real", "computed"))
    assert p == {"tokens_real": 90, "tokens_computed": 120, "padding_share": 0.25}


def test_mlx_summary_reads_per_step_reference_misses():
    proc = {"t_spawn": 0.0, "t_exit": 30.0, "wall_s": 30.0, "peak_rss_mb": 800.0, "cpu_s": 45.0}
    metrics = [  # today's metrics.jsonl: the step's misses and the running total
        {"step_time": 4.0, "ref_misses": 16, "ref_misses_total": 16, "loss": 0.5},
        {"step_time": 4.0, "ref_misses": 16, "ref_misses_total": 32, "loss": 0.5},
        {"step_time": 2.0, "ref_misses": 0, "ref_misses_total": 32, "loss": 0.49},
    ]
    rec = {"step_end_times": [9.0, 13.5, 15.6]}
    s = h2h.summarize_mlx(proc, rec, metrics, per_epoch=2)
    assert s["warm_steps"] == 1 and s["warm_step_median_s"] == pytest.approx(2.1)
    assert s["cold_step_median_s"] == pytest.approx(4.25)
