"""Diversity probes during training and the mode-collapse warning."""

import contextlib
import json
import math

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.errors import UserError
from mlx_kto.judge import probes as probes_module
from mlx_kto.judge import sample as sample_module
from mlx_kto.judge.probes import DiversityProbe, collapsed, make_probe
from mlx_kto.judge.sample import Sample

import pytest

BASE = {"distinct_1": 0.4, "distinct_2": 0.6, "self_bleu": 0.5, "entropy": 1.0, "length": 9.0}


def test_collapsed_names_each_fallen_figure():
    assert collapsed(BASE, BASE, 0.5) == []
    low = {**BASE, "distinct_2": 0.2, "self_bleu": 0.9, "entropy": 0.6}
    fallen = collapsed(low, BASE, 0.5)
    # distinct-2 0.2 < 0.3; novelty 0.1 < 0.25; entropy 0.6 is not < 0.5
    assert [f.split(" ")[0] for f in fallen] == ["distinct-2", "1"]
    assert "0.200 < 0.5 x base 0.600" in fallen[0]
    assert collapsed({**BASE, "self_bleu": None}, BASE, 0.5) == []


def test_probe_schedule_and_warns_once(monkeypatch):
    cfg = KTOConfig(diversity_every=3, steps_per_save=5, collapse_threshold=0.5)
    logs = []
    probe = DiversityProbe(None, None, [[1, 2]], cfg, log=logs.append)
    probe.base = dict(BASE)
    low = {**BASE, "distinct_2": 0.1}
    figures = iter([BASE, low, low, BASE, low])
    monkeypatch.setattr(probe, "measure", lambda: next(figures))
    records = {s: {"step": s} for s in range(1, 11)}
    for s, r in records.items():
        probe(s, r, 10)
    due = [s for s, r in records.items() if "diversity/distinct_2" in r]
    assert due == [3, 5, 6, 9, 10]  # every 3, the checkpoint at 5, the last step
    assert [s for s, r in records.items() if r.get("diversity/collapse")] == [5, 6, 10]
    assert sum("mode collapse" in m for m in logs) == 1 and "step 5" in logs[0]
    assert records[3]["diversity/base/distinct_2"] == 0.6


def test_probe_settings_are_checked():
    for field, value in (
        ("diversity_samples", 1),
        ("collapse_threshold", 1.5),
        ("diversity_every", -1),
        ("diversity_prompts", 0),
    ):
        with pytest.raises(UserError, match=field):
            make_probe(KTOConfig(**{"diversity_every": 5, field: value}), None, None, [])
    assert make_probe(KTOConfig(), None, None, [object()]) is None  # off by default


def test_collapse_threshold_is_a_strict_share_of_the_base():
    # distinct-2 exactly 0.5 x base is not a collapse; a hair below is
    at = {**BASE, "distinct_2": 0.3}
    assert collapsed(at, BASE, 0.5) == []
    below = {**BASE, "distinct_2": 0.3 - 1e-9}
    assert [f.split(" ")[0] for f in collapsed(below, BASE, 0.5)] == ["distinct-2"]
    # every checked figure on its own, and a base of 0 (nothing to fall from) never triggers
    assert collapsed({**BASE, "entropy": 0.49}, BASE, 0.5)[0].startswith("entropy 0.490")
    assert collapsed({**BASE, "self_bleu": 0.76}, BASE, 0.5)[0].startswith("1 - self-BLEU")
    zero = {**BASE, "distinct_2": 0.0}
    assert collapsed(zero, zero, 0.5) == []


@pytest.mark.parametrize("threshold, flagged", [(0.5, True), (0.4, False)])
def test_the_configured_threshold_decides(monkeypatch, threshold, flagged):
    cfg = KTOConfig(diversity_every=1, steps_per_save=0, collapse_threshold=threshold)
    logs = []
    probe = DiversityProbe(None, None, [[1, 2]], cfg, log=logs.append)
    probe.base = dict(BASE)
    monkeypatch.setattr(probe, "measure", lambda: {**BASE, "distinct_2": 0.45 * 0.6})
    record = {}
    probe(1, record, 5)
    assert bool(record.get("diversity/collapse")) is flagged
    assert sum("mode collapse" in m for m in logs) == (1 if flagged else 0)


def _samples(texts_per_prompt, entropy):
    """Sampler output: Sample objects with `entropy` nats per measured position."""
    out = []
    for texts in texts_per_prompt:
        per = []
        for t in texts:
            n = len(t.split())
            per.append(Sample(t, list(range(3, 3 + n)), entropy * (n + 1), n + 1))
        out.append(per)
    return out


WORDS = iter(f"w{i}" for i in range(10_000))
HEALTHY = _samples(
    [[" ".join(next(WORDS) for _ in range(6)) for _ in range(3)] for _ in range(4)], 2.0
)
COLLAPSED = _samples([["i cannot help with that ."] * 3 for _ in range(4)], 0.05)


def test_collapsed_samples_trigger_the_warning_once(monkeypatch):
    """The monitor fed real sample sets (the sampler stubbed): varied replies are healthy,
    one reply repeated with a sure model is a collapse; the warning comes once, the flag at
    every collapsed probe."""
    draws = iter([HEALTHY, HEALTHY, COLLAPSED, COLLAPSED, HEALTHY, COLLAPSED])

    def sample_replies(model, tokenizer, prompt_ids, n, max_tokens, temp, seed):
        assert (n, max_tokens, temp) == (3, 16, 1.0) and len(prompt_ids) == 4
        return next(draws)

    for module in (sample_module, probes_module):  # wherever probes.py takes it from
        monkeypatch.setattr(module, "sample_replies", sample_replies, raising=False)
    no_adapter = lambda *a, **k: contextlib.nullcontext()  # noqa: E731
    monkeypatch.setattr("mlx_kto.model.load.reference_mode", no_adapter)
    monkeypatch.setattr(probes_module, "reference_mode", no_adapter, raising=False)
    cfg = KTOConfig(
        diversity_every=1, diversity_prompts=4, diversity_samples=3, diversity_max_tokens=16,
        collapse_threshold=0.5, steps_per_save=0,
    )  # fmt: skip
    logs = []
    probe = make_probe(cfg, None, None, [_Row([i, 1]) for i in range(6)], log=logs.append)
    assert probe.base["distinct_2"] == 1.0 and probe.base["self_bleu"] == 0.0
    assert probe.base["entropy"] == pytest.approx(2.0)
    records = {s: {"step": s} for s in range(1, 6)}
    for s, r in records.items():
        probe(s, r, 5)
    assert [s for s, r in records.items() if r.get("diversity/collapse")] == [2, 3, 5]
    warnings = [m for m in logs if "mode collapse" in m]
    assert len(warnings) == 1 and "at step 2" in warnings[0]
    for figure in ("distinct-2", "1 - self-BLEU", "entropy"):
        assert figure in warnings[0]
    assert records[2]["diversity/self_bleu"] == pytest.approx(1.0)
    assert records[2]["diversity/base/distinct_2"] == 1.0


class _Row:
    def __init__(self, prompt_ids):
        self.prompt_ids = prompt_ids


@pytest.mark.slow
def test_training_with_the_probe_records_its_figures(tmp_path):
    """End to end on the demo model: what any machine reproduces. Whether this short run
    collapses follows float rounding (it did at lr 1e-2 on one BLAS, not on another), so
    only the records, their ranges and the flag/warning agreement are asserted."""
    from mlx_kto.demo import ASSETS
    from mlx_kto.judge.probes import training_extras
    from mlx_kto.train.run import train

    rows = (ASSETS / "data" / "train.jsonl").read_text().splitlines()[:48]
    data = tmp_path / "feedback.jsonl"
    data.write_text("\n".join(rows) + "\n")
    cfg = make_config(
        None, model=str(ASSETS / "model"), data=str(data), adapter_path=str(tmp_path / "run"),
        dtype="float32", iters=4, batch_size=8, learning_rate=1e-3, max_length=64,
        steps_per_eval=0, steps_per_save=0, diversity_every=2, diversity_prompts=3,
        diversity_samples=2, diversity_max_tokens=8, no_ref_cache=True, quiet=True,
    )  # fmt: skip
    logs = []
    train(cfg, log=logs.append, extras=training_extras())
    assert any(m.startswith("diversity of the base (3 prompts)") for m in logs)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    probed = [r for r in records if "diversity/distinct_2" in r]
    assert [r["step"] for r in probed] == [2, 4]
    for r in probed:
        for pre in ("diversity/", "diversity/base/"):
            assert 0 <= r[pre + "distinct_1"] <= 1 and 0 <= r[pre + "distinct_2"] <= 1
            assert r[pre + "self_bleu"] is None or 0 <= r[pre + "self_bleu"] <= 1
            assert math.isfinite(r[pre + "entropy"]) and r[pre + "entropy"] >= 0
            assert 0 <= r[pre + "length"] <= 8
        assert r.get("diversity/collapse", 1) == 1
    # the flag and the one warning agree, whichever way this machine's run went
    flagged = [r["step"] for r in probed if r.get("diversity/collapse")]
    warnings = [m for m in logs if "mode collapse" in m]
    assert len(warnings) == (1 if flagged else 0)
    if flagged:
        assert f"at step {flagged[0]}" in warnings[0]
