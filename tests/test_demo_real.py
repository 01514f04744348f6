"""`mlx-kto demo --real`: the rating rule (fast) and a tiny run on SmolLM2 (slow)."""

from mlx_kto.demo.real import RealDemoSizes, is_desirable, run_real_demo, share

import pytest
from assets_smollm2 import smollm2_gguf  # noqa: F401  (fixture)


def test_rating_rule():
    assert is_desirable("The capital of France is Paris.")
    assert is_desirable('  "The sky is blue."')
    assert not is_desirable("There is a cat.")  # the word, not the prefix
    assert not is_desirable("Bees make honey. The end.")
    assert not is_desirable("")
    assert share([["The a", "b"], ["c", "The d"]]) == 0.5


@pytest.mark.slow
def test_real_demo_tiny(smollm2_gguf, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MLX_KTO_TEST_ASSETS", str(smollm2_gguf.parent))
    lines = []
    sizes = RealDemoSizes(train_prompts=6, train_samples=2, heldout_prompts=2,
                          heldout_samples=2, max_tokens=6, steps=2)  # fmt: skip
    try:
        res = run_real_demo(str(tmp_path / "real"), sizes, seed=0, echo=lines.append)
    except Exception as e:  # a seed where every reply got one rating is a UserError
        pytest.fail(f"real demo failed: {e}")
    assert res["steps"] == 2
    assert 0.0 <= res["before"] <= 1.0 and 0.0 <= res["after"] <= 1.0
    assert any("->" in x and "held-out" in x for x in lines), lines
