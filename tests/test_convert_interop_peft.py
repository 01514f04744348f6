"""Interop with the real consumer: transformers + PEFT on torch CPU.

mlx adapters exported with to-peft load in `PeftModel.from_pretrained` and give mlx's
logits; adapters made by PEFT itself (plain, rsLoRA with rank/alpha patterns, DoRA,
layer subsets) come back through from-peft with PEFT's logits; PEFT-only features are
refused on real PEFT files. CI installs torch and peft (.ci/interop.sh).
"""

import json

from mlx_kto.errors import UserError
from mlx_kto.export import from_peft, read_adapter, to_peft

import numpy as np
import pytest
from adapter_fixtures import logits, make_adapter
from mlx_lm import load
from mlx_lm.tuner.utils import load_adapters
from toy import build_model

torch = pytest.importorskip("torch", reason="torch not installed (CI installs it: .ci/interop.sh)")
peft = pytest.importorskip("peft", reason="peft not installed (CI installs it: .ci/interop.sh)")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.interop
TOKENS = [1, 5, 9, 30, 40, 7, 3, 11, 2]
TOL = 1e-3


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen2, tmp_path_factory):
    phi3 = build_model(tmp_path_factory.mktemp("phi3"), family="phi3", seed=2)
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "phi3": phi3}


def _hf(base):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return m.eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float().numpy()


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", {"rank": 4, "scale": 2.0}),
        ("qwen2", {"rank": 8, "scale": 20.0, "b_std": 0.01}),
        ("phi3", {"rank": 4, "scale": 3.0}),
        ("llama", {"rank": 4, "scale": 2.0, "dora": True}),
        (
            "llama",
            {"rank": 6, "scale": 0.7, "num_layers": 1, "keys": ["self_attn.q_proj", "lm_head"]},
        ),
    ],
)
def test_peft_loads_exported_adapter(bases, tmp_path, family, kw):
    kw = {"num_layers": 2, **kw}
    src, model = make_adapter(bases[family], tmp_path / "mlx", **kw)
    out = to_peft(src, tmp_path / "peft", base=str(bases[family]))
    pm = peft.PeftModel.from_pretrained(_hf(bases[family]), str(out)).eval()
    lora = next(m for m in pm.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert lora.scaling["default"] == pytest.approx(kw["scale"], rel=1e-12)
    got, want = _torch_logits(pm), logits(model, TOKENS)
    base_logits = _torch_logits(_hf(bases[family]))
    assert np.abs(want - base_logits).max() > 0.02  # the adapter matters
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _peft_made(base, out, seed=0, **cfg):
    """Save an adapter created by PEFT itself, with random non-zero B (and magnitudes)."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(_hf(base), peft.LoraConfig(task_type="CAUSAL_LM", **cfg))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.eval()
    pm.save_pretrained(str(out))
    return pm


@pytest.mark.parametrize(
    "cfg",
    [
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": "all-linear",
         "rank_pattern": {"k_proj": 4, "down_proj": 2}, "alpha_pattern": {r"layers\.1\.mlp\.up_proj": 3}},
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "o_proj", "gate_proj"]},
        {"r": 4, "lora_alpha": 4, "target_modules": ["v_proj", "down_proj"], "layers_to_transform": [1]},
    ],
)  # fmt: skip
def test_peft_made_adapter_converts_to_mlx(bases, tmp_path, cfg):
    base = bases["llama"]
    pm = _peft_made(base, tmp_path / "peft", **cfg)
    want = _torch_logits(pm)
    out = from_peft(tmp_path / "peft", tmp_path / "mlx", base=str(base))
    ad = read_adapter(out)
    if cfg.get("layers_to_transform") == [1]:
        assert ad.num_layers == 1
    model, _ = load(str(base))
    load_adapters(model, str(out))
    got = logits(model.eval(), TOKENS)
    assert np.abs(want - _torch_logits(_hf(base))).max() > 0.02
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_peft_only_features_are_refused(bases, tmp_path):
    base = bases["llama"]
    _peft_made(base, tmp_path / "mts", r=4, lora_alpha=8, target_modules=["q_proj"],
               modules_to_save=["lm_head"])  # fmt: skip
    with pytest.raises(UserError, match="modules_to_save"):
        from_peft(tmp_path / "mts", tmp_path / "o1", base=str(base))
    pm = _peft_made(base, tmp_path / "ok", r=4, lora_alpha=8, target_modules=["q_proj"])
    pm.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    with pytest.raises(UserError, match="pickled"):
        from_peft(tmp_path / "bin", tmp_path / "o2", base=str(base))
    cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"  # the real file passes our config checks
    from_peft(tmp_path / "ok", tmp_path / "o3", base=str(base))


def test_peft_lm_head_adapter_skips_the_saved_base_copy(bases, tmp_path, capfd):
    """PEFT 0.21 saves `lm_head.base_layer.weight` (a copy of the base weight) with LoRA
    on lm_head; it is skipped after checking it equals the base's, and refused when the
    adapter was saved on another base."""
    base = bases["llama"]
    pm = _peft_made(
        base, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]
    )
    from safetensors import safe_open

    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "np") as f:
        assert "base_model.model.lm_head.base_layer.weight" in set(f.keys())
    out = from_peft(tmp_path / "peft", tmp_path / "mlx", base=str(base))
    assert "equal to the base's" in capfd.readouterr().err
    assert "lm_head" in read_adapter(out).modules
    model, _ = load(str(base))
    load_adapters(model, str(out))
    want = _torch_logits(pm)
    assert np.abs(want - _torch_logits(_hf(base))).max() > 0.02
    np.testing.assert_allclose(logits(model.eval(), TOKENS), want, atol=TOL, rtol=0)

    # base_model_name_or_path (a local folder here) is the default base
    from_peft(tmp_path / "peft", tmp_path / "mlx_default")
    assert "equal to the base's" in capfd.readouterr().err
    conf = tmp_path / "peft" / "adapter_config.json"
    conf.write_text(
        json.dumps({**json.loads(conf.read_text()), "base_model_name_or_path": "x/absent"})
    )
    from_peft(tmp_path / "peft", tmp_path / "mlx_nobase")  # no base at hand: a note
    assert "not compared: no base at hand" in capfd.readouterr().err
    other = build_model(tmp_path / "other", family="llama", seed=7)
    with pytest.raises(UserError, match=r"lm_head\.base_layer\.weight.*differs from the base"):
        from_peft(tmp_path / "peft", tmp_path / "mlx_other", base=str(other))
