"""mlx-lm adapters <-> PEFT folders, without torch: exact round trips, scaling rules
(alpha = scale * r, rsLoRA, rank/alpha patterns) and every refusal."""

import json
import math
import struct

from mlx_kto.errors import UserError
from mlx_kto.export import from_peft, read_adapter, to_peft
from mlx_kto.export.peft import alpha_for_scale, scale_for_alpha

import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits, make_adapter
from mlx_lm import load
from mlx_lm.tuner.utils import load_adapters
from toy import build_model

TOKENS = [1, 5, 9, 30, 40, 7, 3]


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("tiny_phi3"), family="phi3", seed=2)


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen2, tiny_phi3):
    return {"llama": tiny_llama, "qwen2": tiny_qwen2, "phi3": tiny_phi3}


def _arrays(path):
    """name -> numpy array; bfloat16 as its raw uint16 bits (numpy has no bfloat16)."""
    out = {}
    for k, v in mx.load(str(path)).items():
        out[k] = np.array(v.view(mx.uint16)) if v.dtype == mx.bfloat16 else np.array(v)
    return out


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.parametrize(
    "family,kw",
    [
        ("llama", {"num_layers": 2, "rank": 4, "scale": 2.0}),
        ("llama", {"num_layers": 1, "rank": 6, "scale": 0.1, "keys": ["self_attn.q_proj"]}),
        ("qwen2", {"num_layers": 2, "rank": 8, "scale": 20.0, "dtype": mx.bfloat16}),
        ("phi3", {"num_layers": 2, "rank": 4, "scale": 3.0}),
        ("llama", {"num_layers": 2, "rank": 4, "scale": 2.0, "dora": True}),
    ],
)
def test_mlx_peft_mlx_round_trip_is_bit_identical(bases, tmp_path, family, kw):
    src, model = make_adapter(bases[family], tmp_path / "mlx", **kw)
    peft_dir = to_peft(src, tmp_path / "peft")
    back = from_peft(peft_dir, tmp_path / "back", base=str(bases[family]))

    ta, tb = mx.load(str(src / "adapters.safetensors")), mx.load(str(back / "adapters.safetensors"))
    assert sorted(ta) == sorted(tb)
    assert {v.dtype for v in tb.values()} == {kw.get("dtype", mx.float32)}
    a, b = _arrays(src / "adapters.safetensors"), _arrays(back / "adapters.safetensors")
    for k in a:
        assert ta[k].dtype == tb[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k

    ra, rb = read_adapter(src), read_adapter(back)
    assert (rb.fine_tune_type, rb.num_layers, rb.rank) == (
        ra.fine_tune_type,
        ra.num_layers,
        ra.rank,
    )
    assert rb.scale == ra.scale  # exact: lora_alpha is chosen so alpha / r == scale
    present = {p.split(".", 3)[3] for p in ra.modules}  # block-relative paths
    assert set(rb.keys) == present == set(kw.get("keys") or present)

    # The converted folder loads in mlx-lm and gives the same logits.
    m2, _ = load(str(bases[family]))
    load_adapters(m2, str(back))
    m2.eval()
    np.testing.assert_array_equal(logits(m2, TOKENS), logits(model, TOKENS))


def test_peft_layout(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1, rank=4, scale=2.5)
    out = to_peft(src, tmp_path / "peft", base="org/llama-base")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 10 and cfg["use_rslora"] is False
    assert cfg["base_model_name_or_path"] == "org/llama-base"
    assert cfg["layers_to_transform"] == [1]  # num_layers=1: the last of 2 blocks
    assert "self_attn.q_proj" in cfg["target_modules"] and "mlp.down_proj" in cfg["target_modules"]
    assert _header(out / "adapter_model.safetensors")["__metadata__"] == {"format": "pt"}

    mlx = _arrays(src / "adapters.safetensors")
    peft = _arrays(out / "adapter_model.safetensors")
    a = "model.layers.1.self_attn.q_proj"
    A, B = peft[f"base_model.model.{a}.lora_A.weight"], peft[f"base_model.model.{a}.lora_B.weight"]
    assert A.shape == (4, 64) and B.shape == (64, 4)  # [r, in], [out, r]
    np.testing.assert_array_equal(A, mlx[f"{a}.lora_a"].T)
    np.testing.assert_array_equal(B, mlx[f"{a}.lora_b"].T)
    assert len(peft) == len(mlx)


def test_top_level_module_uses_full_names(tiny_llama, tmp_path):
    keys = ["self_attn.v_proj", "lm_head"]
    src, model = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1, keys=keys)
    out = to_peft(src, tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] is None
    assert cfg["target_modules"] == ["lm_head", "model.layers.1.self_attn.v_proj"]
    back = from_peft(out, tmp_path / "back", base=str(tiny_llama))
    assert read_adapter(back).keys == ["self_attn.v_proj", "lm_head"]
    m2, _ = load(str(tiny_llama))
    load_adapters(m2, str(back))
    np.testing.assert_array_equal(logits(m2.eval(), TOKENS), logits(model, TOKENS))


@pytest.mark.parametrize(
    "scale,r", [(0.1, 6), (1 / 3, 7), (20.0, 8), (0.7, 3), (1e-3, 5), (2.5, 16)]
)
def test_scale_alpha_round_trip(scale, r):
    alpha = alpha_for_scale(scale, r)
    assert abs(alpha / r - scale) <= math.ulp(scale)  # what PEFT computes
    assert scale_for_alpha(alpha, r) == scale
    assert scale_for_alpha(alpha, r, rslora=True) == alpha / math.sqrt(r)


def _edit_peft(out, cfg_updates=None, tensor_fn=None):
    """Rewrite a PEFT folder's config and/or tensors in place."""
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(cfg_updates or {})
    cfg_path.write_text(json.dumps(cfg))
    if tensor_fn is not None:
        t = mx.load(str(out / "adapter_model.safetensors"))
        t = tensor_fn(t)
        mx.save_safetensors(str(out / "adapter_model.safetensors"), t)


def _delta(A, B, s):
    """PEFT's dense update s * B @ A, [out, in]."""
    return s * np.array(B, np.float64) @ np.array(A, np.float64)


def test_rslora_and_rank_alpha_patterns(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2, rank=4, scale=2.0)
    out = to_peft(src, tmp_path / "peft")

    def cut_q_rank(t):  # q_proj keeps rank 2 (the first two rank rows/cols)
        t = dict(t)
        for k in list(t):
            if ".q_proj.lora_A" in k:
                t[k] = t[k][:2]
            elif ".q_proj.lora_B" in k:
                t[k] = t[k][:, :2]
        return t

    _edit_peft(
        out,
        {"use_rslora": True, "lora_alpha": 6.0, "rank_pattern": {"q_proj": 2},
         "alpha_pattern": {"model.layers.1.self_attn.v_proj": 1.5}},
        cut_q_rank,
    )  # fmt: skip
    peft = mx.load(str(out / "adapter_model.safetensors"))
    back = from_peft(out, tmp_path / "back", base=str(tiny_llama))
    ad = read_adapter(back)
    assert ad.rank == 4 and ad.scale == 6.0 / math.sqrt(4)  # most modules: alpha 6, r 4
    for path, mod in ad.modules.items():
        A = peft[f"base_model.model.{path}.lora_A.weight"]
        B = peft[f"base_model.model.{path}.lora_B.weight"]
        r = 2 if path.endswith("q_proj") else 4
        alpha = 1.5 if path == "model.layers.1.self_attn.v_proj" else 6.0
        want = _delta(A, B, alpha / math.sqrt(r))
        got = _delta(mod.a.T, mod.b.T, ad.scale)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=path)
    # mlx-lm accepts the padded shapes.
    m2, _ = load(str(tiny_llama))
    load_adapters(m2, str(back))


def test_from_peft_without_base_needs_layer_count(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    out = to_peft(src, tmp_path / "peft", base="org/not-local")
    # Layers start at block 0: "all blocks" (-1) needs no count.
    assert read_adapter(from_peft(out, tmp_path / "all")).num_layers == -1
    src1, _ = make_adapter(tiny_llama, tmp_path / "mlx1", num_layers=1)
    out1 = to_peft(src1, tmp_path / "peft1", base="org/not-local")
    with pytest.raises(UserError, match="pass --base"):
        from_peft(out1, tmp_path / "one")


@pytest.fixture()
def peft_dir(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    return to_peft(src, tmp_path / "peft")


@pytest.mark.parametrize(
    "updates,match",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"fan_in_fan_out": True}, "Conv1D"),
        ({"layer_replication": [[0, 2]]}, "replication"),
        ({"alora_invocation_tokens": [5, 6]}, "aLoRA"),
        ({"use_qalora": True}, "QALoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "residual"),
        ({"some_future_option": {"x": 1}}, "unknown PEFT option"),
        ({"peft_type": "IA3"}, "only 'LORA'"),
        ({"r": 8}, "rank 4 in the tensors but 8"),
        ({"use_dora": True}, "no lora_magnitude_vector"),
    ],
)
def test_from_peft_refusals(peft_dir, tmp_path, updates, match):
    _edit_peft(peft_dir, updates)
    with pytest.raises(UserError, match=match):
        from_peft(peft_dir, tmp_path / "out")


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"base_model.model.lm_head.weight": mx.zeros((8, 64))}, "not a LoRA"),
        ({"base_model.model.model.embed_tokens.lora_embedding_A": mx.zeros((4, 8))}, "embeddings"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": mx.zeros((4, 64))},
         "not a LoRA"),
        ({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": mx.zeros((64,))}, "not a LoRA"),
    ],
)  # fmt: skip
def test_from_peft_refuses_unknown_tensors(peft_dir, tmp_path, extra, match):
    _edit_peft(peft_dir, tensor_fn=lambda t: {**t, **extra})
    with pytest.raises(UserError, match=match):
        from_peft(peft_dir, tmp_path / "out")


def test_from_peft_refuses_pickle_and_missing_pair(peft_dir, tmp_path):
    _edit_peft(
        peft_dir,
        tensor_fn=lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" not in k},
    )
    with pytest.raises(UserError, match="has no lora_B"):
        from_peft(peft_dir, tmp_path / "out")
    (peft_dir / "adapter_model.safetensors").rename(peft_dir / "adapter_model.bin")
    with pytest.raises(UserError, match="pickled"):
        from_peft(peft_dir, tmp_path / "out2")


def test_from_peft_checks_base_shapes(peft_dir, tmp_path):
    other = build_model(tmp_path / "wide", family="llama", hidden_size=96, num_attention_heads=4)
    with pytest.raises(UserError, match="does not fit base"):
        from_peft(peft_dir, tmp_path / "out", base=str(other))


def test_to_peft_refusals(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    # Wrong base (different width).
    other = build_model(tmp_path / "wide", family="llama", hidden_size=96, num_attention_heads=4)
    with pytest.raises(UserError, match="does not fit base"):
        to_peft(src, tmp_path / "p1", base=str(other))
    # An MLX-quantized base is not a PEFT base.
    from mlx_kto.export import hf_to_mlx

    q = hf_to_mlx(str(tiny_llama), tmp_path / "q4", quantize=True, q_group_size=32)
    with pytest.raises(UserError, match="MLX-quantized"):
        to_peft(src, tmp_path / "p2", base=str(q))
    # Non-empty output folder.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        to_peft(src, tmp_path / "busy")
    to_peft(src, tmp_path / "busy", overwrite=True)
    assert (tmp_path / "busy" / "x").read_text() == "x"  # --overwrite deletes nothing
    with pytest.raises(UserError, match="input folder"):
        to_peft(src, src, overwrite=True)
    with pytest.raises(UserError, match="input folder"):
        from_peft(tmp_path / "busy", tmp_path / "busy", overwrite=True)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["lora_parameters"].pop("scale") and c["lora_parameters"].update(alpha=16), "not alpha"),
        (lambda c: c.update(fine_tune_type="full"), "whole weights"),
        (lambda c: c.update(num_layers="2"), "num_layers"),
        (lambda c: c["lora_parameters"].update(rank=8), "do not have rank 8"),
    ],
)  # fmt: skip
def test_read_adapter_refusals(tiny_llama, tmp_path, edit, match):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    cfg = json.loads((src / "adapter_config.json").read_text())
    edit(cfg)
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=match):
        to_peft(src, tmp_path / "p")


def test_read_adapter_refuses_foreign_tensors(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    t = mx.load(str(src / "adapters.safetensors"))
    t["model.layers.1.self_attn.q_proj.weight"] = mx.zeros((64, 64))
    mx.save_safetensors(str(src / "adapters.safetensors"), t)
    with pytest.raises(UserError, match="not a LoRA leaf"):
        read_adapter(src)
    with pytest.raises(UserError, match="not found"):
        read_adapter(tmp_path / "nope")


@pytest.mark.parametrize(
    "content,match",
    [
        (b"[1, 2]", "adapter_config.json: expected a JSON object"),
        (b'{"r": 4,\n oops}', "adapter_config.json: invalid JSON at line 2"),
        (b"\xff\xfe{}", "adapter_config.json: not UTF-8"),
    ],
)
def test_config_files_are_json_objects_or_one_line(peft_dir, tiny_llama, tmp_path, content, match):
    """Every converter reads its config files through export._io.read_json_object."""
    (peft_dir / "adapter_config.json").write_bytes(content)
    with pytest.raises(UserError, match=match):
        from_peft(peft_dir, tmp_path / "out")
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    (src / "adapter_config.json").write_bytes(content)
    with pytest.raises(UserError, match=match):
        to_peft(src, tmp_path / "out2")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
