"""mlx-lm adapter -> llama.cpp LoRA GGUF, checked by reading it back with gguf.GGUFReader:
keys and types, names, shapes, and W + (alpha/r)·B·A (after undoing the Llama q/k row
permutation) equal to the fused Hugging Face weight."""

import json

from mlx_kto.errors import UserError
from mlx_kto.export import fuse, read_lora_file, to_gguf
from mlx_kto.export.base import load_base
from mlx_kto.export.gguf_lora import (
    GGUFLora,
    base_gguf_tensors,
    check_lora,
    llama_permute_rows,
    llama_unpermute_rows,
)

import gguf
import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import make_adapter
from toy import build_model

# family -> (GGUF arch, q/k permuted); llama has 4 q heads / 2 kv heads (GQA).
FAMILIES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "phi3": ("phi3", False),
            "mistral": ("llama", True)}  # fmt: skip


@pytest.fixture(scope="module")
def bases(tiny_llama, tiny_qwen2, tmp_path_factory):
    out = {"llama": tiny_llama, "qwen2": tiny_qwen2}
    out["phi3"] = build_model(tmp_path_factory.mktemp("phi3"), family="phi3", seed=2)
    out["mistral"] = build_model(tmp_path_factory.mktemp("mistral"), family="mistral", seed=3)
    return out


def test_permutation_matches_llama_cpp_formula():
    n_head, d, r = 3, 8, 2
    b = np.arange(n_head * d * r, dtype=np.float32).reshape(n_head * d, r)
    p = llama_permute_rows(b, n_head)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):  # B_gguf[h*d + 2i + j] = B_hf[h*d + j*(d/2) + i]
                np.testing.assert_array_equal(p[h * d + 2 * i + j], b[h * d + j * (d // 2) + i])
    np.testing.assert_array_equal(llama_unpermute_rows(p, n_head), b)


def _gguf_arrays(path):
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.array(t.data)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = (t.tensor_type, tuple(int(x) for x in t.shape), data.astype(np.float32))
    return r, out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_lora_reconstructs_fused_weights(bases, tmp_path, family):
    base = bases[family]
    rank, scale = 4, 1.5
    src, _ = make_adapter(base, tmp_path / "mlx", num_layers=2, rank=rank, scale=scale)
    out = to_gguf(src, tmp_path / "lora.gguf", base=str(base))
    reader, tensors = _gguf_arrays(out)
    arch, permuted = FAMILIES[family]

    f = reader.fields
    assert f["general.architecture"].contents() == arch
    assert f["general.type"].contents() == "adapter"
    assert f["adapter.type"].contents() == "lora"
    assert f["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    alpha = f["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(scale * rank)
    for key in ("general.type", "adapter.type", "general.architecture"):
        assert f[key].types == [gguf.GGUFValueType.STRING]

    cfg = json.loads((base / "config.json").read_text())
    hidden, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    names = {n.rsplit(".", 1)[0] for n in tensors}
    want_leaf = (["attn_qkv", "attn_output", "ffn_up", "ffn_down"] if family == "phi3"
                 else ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"])  # fmt: skip
    assert names == {f"blk.{i}.{leaf}.weight" for i in range(n_layers) for leaf in want_leaf}

    fused = fuse(src, tmp_path / "fused")
    W_fused = {k: np.array(v) for k, v in mx.load(str(fused / "model.safetensors")).items()}
    W_base = {k: np.array(v) for k, v in mx.load(str(base / "model.safetensors")).items()}
    gname = {v: k for k, v in _hf_to_gguf_names(base).items()}
    n_perm = 0
    for name in sorted(names):
        ta, sa, A = tensors[f"{name}.lora_a"]
        tb, sb, B = tensors[f"{name}.lora_b"]
        assert ta == tb == gguf.GGMLQuantizationType.F32
        hf = gname[name]
        out_dim, in_dim = W_base[hf].shape
        assert sa == (in_dim, rank) and sb == (rank, out_dim)  # ggml ne
        assert A.shape == (rank, in_dim) and B.shape == (out_dim, rank)  # numpy
        leaf = name.split(".")[2]
        if permuted and leaf in ("attn_q", "attn_k"):
            B = llama_unpermute_rows(B, n_head if leaf == "attn_q" else n_kv)
            n_perm += 1
        # llama.cpp: W + (alpha / r) * B @ A, with r = rank of B.
        rebuilt = W_base[hf] + (alpha / B.shape[1]) * (B @ A)
        np.testing.assert_allclose(rebuilt, W_fused[hf], atol=2e-6, rtol=1e-5, err_msg=name)
        assert np.abs(W_fused[hf] - W_base[hf]).max() > 1e-3  # the adapter does something
    assert n_perm == (2 * n_layers if permuted else 0)
    assert hidden == W_base["model.embed_tokens.weight"].shape[1]


def _hf_to_gguf_names(base):
    info = load_base(str(base))
    arch = gguf.MODEL_ARCH_NAMES
    enum = next(k for k, v in arch.items() if v == {"llama": "llama", "mistral": "llama"}.get(
        info.model_type, info.model_type))  # fmt: skip
    tmap = gguf.get_tensor_name_map(enum, info.n_layers)
    return {
        n: f"{tmap.get_name(n[:-7])}.weight"
        for n, s in info.shapes.items()
        if n.endswith(".weight") and len(s) == 2
    }


def test_permutation_is_applied_only_to_b(bases, tmp_path):
    src, model = make_adapter(bases["llama"], tmp_path / "mlx", num_layers=1, rank=4)
    _, t = _gguf_arrays(to_gguf(src, tmp_path / "l.gguf", base=str(bases["llama"])))
    mlx = {k: np.array(v) for k, v in mx.load(str(src / "adapters.safetensors")).items()}
    q = "model.layers.1.self_attn.q_proj"
    np.testing.assert_array_equal(t["blk.1.attn_q.weight.lora_a"][2], mlx[f"{q}.lora_a"].T)
    assert not np.array_equal(t["blk.1.attn_q.weight.lora_b"][2], mlx[f"{q}.lora_b"].T)
    np.testing.assert_array_equal(
        t["blk.1.attn_q.weight.lora_b"][2], llama_permute_rows(mlx[f"{q}.lora_b"].T, 4)
    )
    v = "model.layers.1.self_attn.v_proj"
    np.testing.assert_array_equal(t["blk.1.attn_v.weight.lora_b"][2], mlx[f"{v}.lora_b"].T)


def test_outtypes(bases, tmp_path):
    src, _ = make_adapter(bases["llama"], tmp_path / "mlx", num_layers=1, rank=4)
    _, f32 = _gguf_arrays(to_gguf(src, tmp_path / "a.gguf", base=str(bases["llama"])))
    _, f16 = _gguf_arrays(
        to_gguf(src, tmp_path / "b.gguf", base=str(bases["llama"]), outtype="f16")
    )
    _, q8 = _gguf_arrays(
        to_gguf(src, tmp_path / "c.gguf", base=str(bases["llama"]), outtype="q8_0")
    )
    T = gguf.GGMLQuantizationType
    for name, (_, shape, x) in f32.items():
        assert f16[name][0] == T.F16 and f16[name][1] == shape
        np.testing.assert_allclose(f16[name][2], x, atol=1e-3)
        # lora_a rows have `in` (64 or 128) values -> Q8_0; lora_b rows have r=4 -> F16.
        assert q8[name][0] == (T.Q8_0 if name.endswith("lora_a") else T.F16), name
        np.testing.assert_allclose(q8[name][2], x, atol=np.abs(x).max() / 100)


def test_lm_head_on_untied_llama_maps_to_output(bases, tmp_path):
    src, _ = make_adapter(bases["llama"], tmp_path / "mlx", num_layers=1, keys=["lm_head"])
    lora = read_lora_file(to_gguf(src, tmp_path / "l.gguf", base=str(bases["llama"])))
    assert set(lora.tensors) == {"output.weight.lora_a", "output.weight.lora_b"}


def test_to_gguf_refusals(bases, tmp_path):
    base = bases["llama"]
    dora, _ = make_adapter(base, tmp_path / "dora", num_layers=1, dora=True)
    with pytest.raises(UserError, match="DoRA"):
        to_gguf(dora, tmp_path / "x.gguf", base=str(base))
    src, _ = make_adapter(base, tmp_path / "mlx", num_layers=1)
    with pytest.raises(UserError, match="does not fit base"):
        to_gguf(src, tmp_path / "x.gguf", base=str(bases["phi3"]))
    # An architecture llama.cpp's LoRA path is not mapped for here.
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((base / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(UserError, match="not supported for GGUF"):
        to_gguf(src, tmp_path / "x.gguf", base=str(odd))
    with pytest.raises(UserError, match="--outtype"):
        to_gguf(src, tmp_path / "x.gguf", base=str(base), outtype="q4_k")
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(UserError, match="exists"):
        to_gguf(src, tmp_path / "exists.gguf", base=str(base))
    assert (tmp_path / "exists.gguf").read_bytes() == b"x"
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def _good_view(base):
    bt = base_gguf_tensors(load_base(str(base)))
    kv = {
        "general.architecture": ("STRING", "llama"),
        "general.type": ("STRING", "adapter"),
        "adapter.type": ("STRING", "lora"),
        "adapter.lora.alpha": ("FLOAT32", 8.0),
    }
    tensors = {"blk.0.attn_q.weight.lora_a": (64, 4), "blk.0.attn_q.weight.lora_b": (4, 64)}
    return GGUFLora(kv, tensors), bt


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda v: v.kv.update({"adapter.lora.alpha": ("FLOAT64", 8.0)}), "llama.cpp asserts FLOAT32"),
        (lambda v: v.kv.update({"general.type": ("STRING", "model")}), "general.type"),
        (lambda v: v.kv.update({"general.architecture": ("STRING", "qwen2")}), "architecture"),
        (lambda v: v.kv.pop("adapter.type"), "missing key adapter.type"),
        (lambda v: v.tensors.update({"rope_freqs.weight": (32,)}), "unexpected suffix"),
        (lambda v: v.tensors.pop("blk.0.attn_q.weight.lora_b"), "missing one component"),
        (lambda v: v.tensors.update({"blk.9.attn_q.weight.lora_a": (64, 4),
                                     "blk.9.attn_q.weight.lora_b": (4, 64)}), "does not exist"),
        (lambda v: v.tensors.update({"blk.0.attn_q.weight.lora_a": (4, 64)}), "incorrect shape"),
        (lambda v: v.tensors.update({"blk.0.attn_q.weight.lora_a": (64, 8)}), "not transposed"),
    ],
)  # fmt: skip
def test_check_lora_matches_llama_cpp_loader(bases, edit, match):
    view, bt = _good_view(bases["llama"])
    check_lora(view, "llama", bt)  # the unedited view passes
    edit(view)
    with pytest.raises(UserError, match=match):
        check_lora(view, "llama", bt)


def test_check_lora_on_a_file_with_a_wrong_alpha_type(bases, tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_key_value(gguf.Keys.Adapter.LORA_ALPHA, 8.0, gguf.GGUFValueType.FLOAT64)
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 64), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((64, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _, bt = _good_view(bases["llama"])
    with pytest.raises(UserError, match="FLOAT32"):
        check_lora(read_lora_file(tmp_path / "bad.gguf"), "llama", bt)
    with pytest.raises(UserError, match="not a readable GGUF"):
        read_lora_file(bases["llama"] / "config.json")
