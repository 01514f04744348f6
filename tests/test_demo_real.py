"""`mlx-kto demo --real`: the rating rule, the prompt split and the padded sampler (fast), and a
tiny run of its rounds on SmolLM2 (slow)."""

import json
from pathlib import Path

from mlx_kto.demo.real import (
    PROMPTS,
    RealDemoSizes,
    is_desirable,
    run_real_demo,
    share,
    split_prompts,
)

import pytest
from assets_smollm2 import smollm2_gguf  # noqa: F401  (fixture)


def test_rating_rule():
    assert is_desirable("The capital of France is Paris.")
    assert is_desirable('  "The sky is blue."')
    assert not is_desirable("There is a cat.")  # the word, not the prefix
    assert not is_desirable("Bees make honey. The end.")
    assert not is_desirable("")
    assert share([["The a", "b"], ["c", "The d"]]) == 0.5


def test_prompt_split_is_fixed_disjoint_and_of_one_kind():
    train, held = split_prompts()
    assert (train, held) == split_prompts()  # fixed draw, whatever the run's seed
    assert not set(train) & set(held) and sorted(train + held) == sorted(PROMPTS)
    assert len(held) == RealDemoSizes().heldout_prompts == 12
    assert len(train) == RealDemoSizes().train_prompts
    assert len(set(PROMPTS)) == len(PROMPTS)
    # One kind: short single questions or requests, none of them a literal "The ..." prompt.
    assert all(len(p) < 40 and p[-1] in "?." and not p.startswith("The") for p in PROMPTS)


def test_left_padded_sampling_matches_per_length_batches():
    """Greedy decoding: prompts of different lengths in one left-padded batch give the same
    replies as the per-length batches (the padding is masked, positions start at 0)."""
    from mlx_kto.demo.run import demo_config, load_policy
    from mlx_kto.demo.sample import sample_completions

    model, tok = load_policy(demo_config(None, None, None, None, True))
    prompts = ["What is two plus two?", "Name a colour.", "Why is the sky blue today?"]
    assert len({len(tok.encode(p)) for p in prompts}) == 3  # really different lengths
    kw = dict(n=2, max_tokens=8, temp=0.0, seed=0)
    assert sample_completions(model, tok, prompts, left_pad=True, **kw) == sample_completions(
        model, tok, prompts, **kw
    )


@pytest.mark.slow
def test_real_demo_tiny(smollm2_gguf, tmp_path, monkeypatch):  # noqa: F811
    """One tiny round through `run_rounds`: the feedback rows carry the rule's labels, the
    shares are those of the held-out replies on disk, and a second call continues the run in
    the folder (nothing sampled again) with the same figures."""
    monkeypatch.setenv("MLX_KTO_TEST_ASSETS", str(smollm2_gguf.parent))
    lines = []
    sizes = RealDemoSizes(rounds=1, train_prompts=8, train_samples=3, heldout_prompts=2,
                          heldout_samples=2, max_tokens=6, steps=2, batch_size=4)  # fmt: skip
    out = tmp_path / "real"
    res = run_real_demo(str(out), sizes, seed=0, echo=lines.append)
    assert res["steps"] == 2 and res["rounds"] == 1
    rows = [json.loads(x) for x in (out / "round-1" / "feedback.jsonl").read_text().splitlines()]
    assert 0 < len(rows) <= 8 * 3  # empty replies are dropped
    assert all(r["label"] == is_desirable(r["completion"][0]["content"]) for r in rows)
    assert all(r["meta"]["round"] == 1 and r["meta"]["sampling"]["n"] == 3 for r in rows)
    assert 0 < sum(r["label"] for r in rows) < len(rows)
    held = [json.loads((out / f"round-{r}" / "heldout.json").read_text()) for r in (0, 1)]
    assert held[0]["prompts"] == split_prompts()[1][:2] == held[1]["prompts"]
    assert [len(s) for s in held[1]["replies"]] == [2, 2]
    assert (res["before"], res["after"]) == (share(held[0]["replies"]), share(held[1]["replies"]))
    assert all(0 <= f <= 1 for f in res["facts"])
    assert (Path(res["adapter_path"]) / "adapters.safetensors").is_file()
    assert any("->" in x and "held-out" in x for x in lines), lines
    assert any(x.startswith("facts kept") for x in lines), lines
    stamp = (out / "round-1" / "feedback.jsonl").stat().st_mtime_ns
    again = run_real_demo(str(out), sizes, seed=0, echo=lambda *_: None)
    assert again["shares"] == res["shares"] and again["facts"] == res["facts"]
    assert (out / "round-1" / "feedback.jsonl").stat().st_mtime_ns == stamp
