"""Fused Hugging Face checkpoints (logits equal base+adapter), hf-to-mlx, and the
`convert` CLI group."""

import json
import struct

from mlx_kto.cli.convert import convert
from mlx_kto.errors import UserError
from mlx_kto.export import fuse, hf_to_mlx

import mlx.core as mx
import numpy as np
import pytest
from adapter_fixtures import logits, make_adapter
from click.testing import CliRunner
from mlx_lm import load
from mlx_lm.tuner.utils import load_adapters
from toy import build_model

TOKENS = [1, 5, 9, 30, 40, 7, 3, 11]


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.fixture(scope="module")
def tiny_phi3(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("phi3"), family="phi3", seed=2)


@pytest.mark.parametrize(
    "family,dora", [("llama", False), ("qwen2", False), ("phi3", False), ("llama", True)]
)
def test_fused_logits_equal_base_plus_adapter(
    tiny_llama, tiny_qwen2, tiny_phi3, tmp_path, family, dora
):
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2, "phi3": tiny_phi3}[family]
    src, model = make_adapter(base, tmp_path / "mlx", num_layers=2, rank=4, scale=2.0, dora=dora)
    out = fuse(src, tmp_path / "fused")

    cfg = json.loads((out / "config.json").read_text())
    base_cfg = json.loads((base / "config.json").read_text())
    assert cfg["architectures"] == base_cfg["architectures"]
    assert cfg["torch_dtype"] == "float32"
    assert _header(out / "model.safetensors")["__metadata__"] == {"format": "pt"}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    # Same tensor names as the base checkpoint (what transformers expects).
    assert set(_header(out / "model.safetensors")) == set(_header(base / "model.safetensors"))

    fused, _ = load(str(out))
    want = logits(model, TOKENS)
    got = logits(fused, TOKENS)
    base_model, _ = load(str(base))
    assert np.abs(want - logits(base_model, TOKENS)).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_fuse_quantized_base_needs_dequantize(tiny_llama, tmp_path):
    q = hf_to_mlx(str(tiny_llama), tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    qcfg = json.loads((q / "config.json").read_text())
    assert qcfg["quantization"]["bits"] == 8 and qcfg["quantization"]["group_size"] == 32
    src, model = make_adapter(q, tmp_path / "qlora", num_layers=2, rank=4, scale=2.0)
    with pytest.raises(UserError, match="--dequantize"):
        fuse(src, tmp_path / "fused")
    out = fuse(src, tmp_path / "fused", dequantize=True)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    assert not any(k.endswith((".scales", ".biases")) for k in _header(out / "model.safetensors"))
    fused, _ = load(str(out))
    np.testing.assert_allclose(logits(fused, TOKENS), logits(model, TOKENS), atol=1e-4, rtol=0)


def test_fuse_refuses_a_cast_that_erases_the_adapter(tmp_path):
    base = build_model(tmp_path / "bf16", family="llama", seed=4)
    m, tok = load(str(base))
    # Re-save the base in bfloat16, like most released checkpoints.
    w = {k: v.astype(mx.bfloat16) for k, v in mx.load(str(base / "model.safetensors")).items()}
    mx.save_safetensors(str(base / "model.safetensors"), w, metadata={"format": "pt"})
    tiny, _ = make_adapter(base, tmp_path / "tiny", num_layers=2, rank=4, scale=1.0, b_std=1e-6)
    with pytest.raises(UserError, match="--dtype float32"):
        fuse(tiny, tmp_path / "f1")
    out = fuse(tiny, tmp_path / "f2", dtype="float32")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    big, model = make_adapter(base, tmp_path / "big", num_layers=2, rank=4, scale=2.0, b_std=0.05)
    out = fuse(big, tmp_path / "f3")  # a real adapter survives the bfloat16 cast
    assert {
        v["dtype"] for k, v in _header(out / "model.safetensors").items() if k != "__metadata__"
    } == {"BF16"}


def test_fuse_refusals(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1)
    with pytest.raises(UserError, match="--llama-cpp-dir"):
        fuse(src, tmp_path / "o", gguf=tmp_path / "x.gguf")
    with pytest.raises(UserError, match="no convert_hf_to_gguf.py"):
        fuse(src, tmp_path / "o", gguf=tmp_path / "x.gguf", llama_cpp_dir=tmp_path)
    with pytest.raises(UserError, match="--dtype"):
        fuse(src, tmp_path / "o", dtype="int8")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    (tmp_path / "busy" / "model-00001-of-00002.safetensors").write_text("stale")
    with pytest.raises(UserError, match="not empty"):
        fuse(src, tmp_path / "busy")
    fuse(src, tmp_path / "busy", overwrite=True)
    names = sorted(p.name for p in (tmp_path / "busy").iterdir())
    assert (
        "f" in names
        and "model.safetensors" in names
        and "model-00001-of-00002.safetensors" not in names
    )
    with pytest.raises(UserError, match="base or adapter folder"):
        fuse(src, tiny_llama, overwrite=True)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.pop("model")
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="pass --base"):
        fuse(src, tmp_path / "o")


def test_fuse_reports_llama_cpp_failure(tiny_llama, tmp_path):
    """The --gguf step runs the user's convert_hf_to_gguf.py and surfaces its error."""
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1)
    lc = tmp_path / "llama.cpp"
    lc.mkdir()
    (lc / "convert_hf_to_gguf.py").write_text(
        "import sys\nprint('BPE pre-tokenizer was not recognized', file=sys.stderr)\nsys.exit(1)\n"
    )
    with pytest.raises(UserError, match="pre-tokenizer was not recognized"):
        fuse(src, tmp_path / "o", gguf=tmp_path / "m.gguf", llama_cpp_dir=lc)
    assert (tmp_path / "o" / "config.json").is_file()  # the HF checkpoint was still written


def test_fuse_gguf_output_is_checked_first_and_written_whole(tiny_llama, tmp_path):
    """An existing --gguf file is refused before the fuse (without --overwrite); a
    converter that dies half-way leaves no partial GGUF; a good run publishes the file."""
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1)
    lc = tmp_path / "llama.cpp"
    lc.mkdir()
    script = lc / "convert_hf_to_gguf.py"
    script.write_text(
        "import sys\nout = sys.argv[sys.argv.index('--outfile') + 1]\n"
        "open(out, 'wb').write(b'GGUF half')\nsys.exit(int(sys.argv[-1] == 'q8_0'))\n"
    )
    old = tmp_path / "old.gguf"
    old.write_bytes(b"an earlier export")
    with pytest.raises(UserError, match="old.gguf: file exists .*--overwrite"):
        fuse(src, tmp_path / "o", gguf=old, llama_cpp_dir=lc)
    assert not (tmp_path / "o").exists() and old.read_bytes() == b"an earlier export"
    new = tmp_path / "new.gguf"
    with pytest.raises(UserError, match="exit 1"):
        fuse(src, tmp_path / "o", gguf=new, llama_cpp_dir=lc, gguf_outtype="q8_0")
    assert not new.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    fuse(src, tmp_path / "o2", gguf=new, llama_cpp_dir=lc)
    assert new.read_bytes() == b"GGUF half"


def test_hf_to_mlx(tiny_llama, tmp_path):
    out = hf_to_mlx(str(tiny_llama), tmp_path / "mlx")
    a, _ = load(str(out))
    b, _ = load(str(tiny_llama))
    np.testing.assert_array_equal(logits(a, TOKENS), logits(b, TOKENS))
    out16 = hf_to_mlx(str(tiny_llama), tmp_path / "f16", dtype="float16")
    assert {v.dtype for v in mx.load(str(out16 / "model.safetensors")).values()} == {mx.float16}
    with pytest.raises(UserError, match="already exists"):
        hf_to_mlx(str(tiny_llama), out)
    with pytest.raises(UserError, match="--q-bits"):
        hf_to_mlx(str(tiny_llama), tmp_path / "q", quantize=True, q_bits=7)
    with pytest.raises(UserError, match="no config.json"):
        hf_to_mlx(str(tmp_path), tmp_path / "q")


def test_cli(tiny_llama, tmp_path):
    src, model = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=2)
    run = CliRunner().invoke
    r = run(convert, ["to-peft", str(src), str(tmp_path / "peft")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    r = run(
        convert,
        ["from-peft", str(tmp_path / "peft"), str(tmp_path / "back"), "--base", str(tiny_llama)],
    )
    assert r.exit_code == 0, r.output
    r = run(convert, ["to-gguf", str(src), str(tmp_path / "l.gguf"), "--base", str(tiny_llama),
                      "--outtype", "f16"])  # fmt: skip
    assert r.exit_code == 0 and "l.gguf" in r.output, r.output
    r = run(convert, ["fuse", str(tmp_path / "back"), str(tmp_path / "fused")])
    assert r.exit_code == 0, r.output
    fused, _ = load(str(tmp_path / "fused"))
    np.testing.assert_allclose(logits(fused, TOKENS), logits(model, TOKENS), atol=1e-4, rtol=0)
    r = run(convert, ["hf-to-mlx", str(tiny_llama), str(tmp_path / "q"), "-q", "--q-bits", "8"])
    assert r.exit_code == 0, r.output
    m2, _ = load(str(tmp_path / "q"))
    load_adapters(m2, str(src))  # QLoRA-style: the same adapter on the quantized base

    # Errors are UserError (the top-level CLI prints them as one line).
    r = run(convert, ["to-gguf", str(src), str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "--base" in r.output  # click usage error
    r = run(convert, ["from-peft", str(tmp_path / "nope"), str(tmp_path / "o")])
    assert isinstance(r.exception, UserError) and "no adapter_config.json" in str(r.exception)
    r = run(convert, ["to-gguf", "--help"])
    assert "--outtype" in r.output and "q8_0" in r.output


def test_fuse_leaves_no_temp_folder(tiny_llama, tmp_path):
    src, _ = make_adapter(tiny_llama, tmp_path / "mlx", num_layers=1)
    fuse(src, tmp_path / "out" / "fused")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fused"]
