"""bench/h2h.py's pieces that need neither torch nor TRL: the fixture's exact round trip
through mlx-kto's tokenization, and the per-trainer summaries."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import h2h  # noqa: E402
import h2h_fixture  # noqa: E402


def test_fixture_text_tokenizes_to_the_fixture_ids(tmp_path):
    h2h_fixture.build_word_tokenizer(tmp_path / "tok")
    text, ids = h2h_fixture.write_fixture(tmp_path, 8)
    assert h2h_fixture.check_round_trip(tmp_path / "tok", text, ids) == 8
    rows = json.loads(ids.read_text())
    assert [r["label"] for r in rows].count(True) == 4
    assert all(r["prompt_ids"][0] == 1 and r["completion_ids"][-1] == 2 for r in rows)
    assert all(56 <= len(r["prompt_ids"]) <= 72 for r in rows)
    # A changed id in the text is caught.
    lines = text.read_text().splitlines()
    first = json.loads(lines[0])
    first["completion"] = first["completion"].replace(" t", " t1", 1)
    text.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    with pytest.raises(AssertionError, match="differently"):
        h2h_fixture.check_round_trip(tmp_path / "tok", text, ids)


def test_mlx_summary_splits_cold_and_warm_steps():
    proc = {"t_spawn": 0.0, "t_exit": 30.0, "wall_s": 30.0, "peak_rss_mb": 800.0, "cpu_s": 45.0}
    metrics = [  # 2 steps per epoch; the reference cache fills in epoch 1
        {"step_time": 4.0, "ref_time": 1.5, "ref_misses": 16, "tokens": 100, "loss": 0.5},
        {"step_time": 4.0, "ref_time": 1.5, "ref_misses": 32, "tokens": 100, "loss": 0.5},
        {"step_time": 2.0, "ref_time": 0.0, "ref_misses": 32, "tokens": 100, "loss": 0.49},
        {"step_time": 3.0, "ref_time": 0.0, "ref_misses": 32, "tokens": 100, "loss": 0.48},
    ]
    rec = {"step_end_times": [9.0, 13.5, 15.6, 18.7]}
    s = h2h.summarize_mlx(proc, rec, metrics, per_epoch=2)
    assert s["startup_s"] == 5.0 and s["loop_s"] == 13.7 and s["tail_s"] == 11.3
    assert s["ref_pass_s"] == 3.0 and s["epoch1_s"] == 8.5
    assert s["warm_steps"] == 2 and s["warm_step_median_s"] == pytest.approx(2.6)
    assert s["step_time_median_s"] == 2.5 and s["cold_step_median_s"] == 4.25
    assert s["cores_used"] == 1.5 and s["tokens"] == 400


def test_trl_summary_without_a_timed_reference_reports_none():
    proc = {"t_spawn": 0.0, "t_exit": 20.0, "wall_s": 20.0, "peak_rss_mb": 1000.0, "cpu_s": 30.0}
    rec = {
        "steps": [[10.0, 12.0], [12.5, 14.0], [14.0, 15.0]],
        "precompute_s": 4.0,
        "ref_in_steps_s": 0.0,
        "ref_in_steps_calls": 0,
        "t_imported": 2.0,
        "t_model_loaded": 3.0,
        "t_trainer_built": 8.0,
        "rss_trainer_built_mb": 700.0,
        "torch_threads": 2,
        "attn_implementation": "sdpa",
        "versions": {},
        "first_loss": 0.5,
        "last_loss": 0.45,
    }
    pre = h2h.summarize_trl(proc, rec, per_epoch=3, precompute=True)
    assert pre["ref_pass_s"] == 4.0 and pre["warm_steps"] == 2
    assert pre["warm_step_median_s"] == 1.5  # end-to-end intervals of steps 2 and 3
    assert pre["step_time_median_s"] == 1.25 and pre["startup_s"] == 10.0
    nopre = h2h.summarize_trl(proc, rec, per_epoch=3, precompute=False)
    assert nopre["ref_pass_s"] is None and nopre["warm_step_median_s"] is None


def test_warm_step_flops_matches_the_issue_scale(tmp_path):
    _, ids = h2h_fixture.write_fixture(tmp_path, 16)
    # ~270 GFLOP per warm micro-batch of 8 (issue 15: 1.72 s at ~48% of 325 GFLOP/s)
    assert 240e9 < h2h.warm_step_flops(ids, per_epoch=2) < 300e9


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--rows", "12"], "multiple of --batch-size"),
        (["--batch-size", "1"], "at least 2"),
        (["--skip-trl", "--skip-mlx"], "nothing left"),
    ],
)
def test_cli_rejects_bad_settings(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        h2h.parse_args(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err
