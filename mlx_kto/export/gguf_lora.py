"""mlx-lm adapter -> llama.cpp LoRA GGUF (`--lora FILE`), written with PyPI `gguf` (no torch).

llama.cpp computes `y = W x + (alpha / r) * B (A x)` with r = rank of B, so we write
A = lora_a.T [r, in], B = lora_b.T [out, r] (numpy shapes; ggml `ne` is reversed) and
`adapter.lora.alpha = scale * r` as FLOAT32. For Llama-family bases llama.cpp stores q/k
rows in interleaved-rope order, so B's rows of attn_q / attn_k get the same permutation
as the base weights (A is never permuted). The result is checked the way llama.cpp's
`llama_adapter_lora_init_impl` checks it, before the file is moved into place.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import check_out_file
from mlx_kto.export.adapters import read_adapter
from mlx_kto.export.base import BaseModel, check_adapter, load_base
from mlx_kto.export.gguf_base import describe
from mlx_kto.runtime.atomic import atomic_write_with

import numpy as np

# HF architecture -> (gguf MODEL_ARCH name, q/k rows permuted like llama.cpp's LlamaModel).
ARCHES = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
    "GemmaForCausalLM": ("GEMMA", False),
    "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
    "Phi3ForCausalLM": ("PHI3", False),
}
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
OUTTYPES = ("f32", "f16", "q8_0")


def gguf_arch(config: dict) -> tuple[str, bool]:
    """(GGUF architecture string, permute q/k) for a base config.json, as llama.cpp's
    convert_hf_to_gguf.py picks the model class from `architectures[0]`."""
    import gguf

    archs = config.get("architectures") or []
    name = archs[0] if archs else _BY_MODEL_TYPE.get(config.get("model_type", ""))
    if name not in ARCHES:
        raise UserError(
            f"base architecture {name or config.get('model_type')!r} is not supported for GGUF "
            f"LoRA export (supported: {', '.join(ARCHES)})"
        )
    arch, permute = ARCHES[name]
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch)], permute


def llama_permute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> ggml interleaved pairs, as llama.cpp's LlamaModel.permute:
    new row h*d + 2i + j = old row h*d + j*(d/2) + i, d = rows / n_head."""
    rows = b.shape[0]
    return b.reshape(n_head, 2, rows // n_head // 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def llama_unpermute_rows(b: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `llama_permute_rows`."""
    rows = b.shape[0]
    return b.reshape(n_head, rows // n_head // 2, 2, *b.shape[1:]).swapaxes(1, 2).reshape(b.shape)


def base_gguf_tensors(base: BaseModel) -> dict[str, tuple[int, int]]:
    """Names and ggml `ne` of the 2-D weights a GGUF of `base` holds (tied heads have none)."""
    import gguf

    arch = gguf_arch(base.config)[0]
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, base.n_layers)
    out = {}
    for name, shape in base.shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            g = tmap.get_name(name[: -len(".weight")])
            if g is not None:
                out[f"{g}.weight"] = (int(shape[1]), int(shape[0]))
    return out


@dataclass
class GGUFLora:
    """What llama.cpp's loader looks at: typed KVs and tensor name -> ggml ne."""

    kv: dict[str, tuple[str, object]]  # key -> (GGUF value type name, value)
    tensors: dict[str, tuple[int, ...]]


def check_lora(lora: GGUFLora, arch: str, base_tensors: dict[str, tuple[int, int]]) -> None:
    """llama.cpp's LoRA loader checks (src/llama-adapter.cpp), in its order: general.type,
    architecture, adapter.type, alpha type, tensor suffixes, complete pairs, names in the
    base, shapes (a.ne[0] == W.ne[0], b.ne[1] == W.ne[1]) and rank (a.ne[1] == b.ne[0]).
    KV types matter: a wrong one aborts llama.cpp (GGML_ASSERT) instead of raising."""

    def kv(key, typ):
        t, v = lora.kv.get(key, (None, None))
        if t is None:
            raise UserError(f"GGUF LoRA: missing key {key}")
        if t != typ:
            raise UserError(f"GGUF LoRA: {key} has type {t}, llama.cpp asserts {typ}")
        return v

    if kv("general.type", "STRING") != "adapter":
        raise UserError("GGUF LoRA: general.type is not 'adapter'")
    if kv("general.architecture", "STRING") != arch:
        raise UserError(f"GGUF LoRA: architecture is not the base's '{arch}'")
    if kv("adapter.type", "STRING") != "lora":
        raise UserError("GGUF LoRA: adapter.type is not 'lora'")
    if "adapter.lora.alpha" in lora.kv:
        kv("adapter.lora.alpha", "FLOAT32")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, ne in lora.tensors.items():
        if name.endswith(".lora_a"):
            pairs.setdefault(name[:-7], {})["a"] = ne
        elif name.endswith(".lora_b"):
            pairs.setdefault(name[:-7], {})["b"] = ne
        elif not name.endswith("_norm.weight"):
            raise UserError(f"GGUF LoRA: tensor '{name}' has unexpected suffix")
    for name, p in pairs.items():
        if "a" not in p or "b" not in p:
            raise UserError(f"GGUF LoRA: tensor pair for '{name}' is missing one component")
        if name not in base_tensors:
            raise UserError(f"GGUF LoRA: tensor '{name}' does not exist in the base model")
        w, a, b = base_tensors[name], p["a"], p["b"]
        if len(a) != 2 or len(b) != 2 or a[0] != w[0] or b[1] != w[1]:
            raise UserError(f"GGUF LoRA: tensor '{name}' has incorrect shape for the base")
        if a[1] != b[0]:
            raise UserError(f"GGUF LoRA: '{name}' lora_a is not transposed (rank mismatch)")


def read_lora_file(path: str | Path) -> GGUFLora:
    """The loader's view of a GGUF file (typed KVs, tensor `ne`)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise UserError(f"{path}: not a readable GGUF file ({e})") from None
    kv = {}
    for key, f in r.fields.items():
        if not key.startswith("GGUF."):
            kv[key] = (f.types[0].name if f.types else "?", f.contents())
    return GGUFLora(kv, {t.name: tuple(int(x) for x in t.shape) for t in r.tensors})


def _encode(x: np.ndarray, outtype: str):
    """(array, raw ggml type or None) for GGUFWriter.add_tensor; q8_0 falls back to F16 for
    rows not a multiple of 32 long (lora_b rows have r elements), like llama.cpp's converter."""
    import gguf

    x = np.ascontiguousarray(x, dtype=np.float32)
    if outtype == "f32":
        return x, None
    if outtype == "q8_0":
        try:
            return gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0), (
                gguf.GGMLQuantizationType.Q8_0
            )
        except gguf.QuantError:
            pass
    return x.astype(np.float16), None


def to_gguf(
    adapter_dir: str | Path,
    out_path: str | Path,
    base: str | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> Path:
    """Convert an mlx-lm LoRA adapter to a llama.cpp LoRA GGUF for the base `base`: a
    Hugging Face folder or cached hub id (its config.json decides the architecture), or the
    base .gguf file itself (its tensor names and shapes are checked); default: the
    adapter's `model`. Load it with `llama-cli -m base.gguf --lora OUT.gguf`."""
    try:
        import gguf
    except ImportError:
        raise UserError(
            "to-gguf needs the gguf package: pip install gguf (a dependency of mlx-kto)"
        ) from None

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    ad = read_adapter(adapter_dir)
    if ad.fine_tune_type == "dora":
        raise UserError(
            f"{adapter_dir}: DoRA adapters cannot be expressed as a llama.cpp LoRA "
            "(no magnitude vector); fuse instead: mlx-kto convert fuse"
        )
    base_ref = base or ad.model
    if not base_ref:
        raise UserError(f"{adapter_dir}: adapter_config.json has no 'model'; pass --base")
    if str(base_ref).lower().endswith(".gguf"):  # the exact GGUF file: its names and shapes
        info, base_tensors, arch, permute = describe(base_ref)
    else:
        info = load_base(base_ref)
        arch, permute = gguf_arch(info.config)
        base_tensors = base_gguf_tensors(info)
    check_adapter(ad, info, where=str(adapter_dir))
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, info.n_layers)
    n_head = int(info.config["num_attention_heads"])
    n_kv = int(info.config.get("num_key_value_heads") or n_head)

    tensors: dict[str, np.ndarray] = {}
    for path, mod in ad.modules.items():
        g = tmap.get_name(path)
        if g is None:
            raise UserError(f"'{path}': no llama.cpp tensor for it in arch '{arch}'")
        if f"{g}.weight" not in base_tensors:
            raise UserError(
                f"'{path}' -> {g}.weight is not in a GGUF of this base (e.g. lm_head on a "
                "tied-embedding model); fuse instead"
            )
        A = np.array(mod.a.T, dtype=np.float32)  # [r, in]
        B = np.array(mod.b.T, dtype=np.float32)  # [out, r]
        heads = {"attn_q": n_head, "attn_k": n_kv}.get(g.rpartition(".")[2])
        if permute and heads:
            if B.shape[0] % (2 * heads):
                raise UserError(f"'{path}': {B.shape[0]} rows do not split into {heads} heads")
            B = llama_permute_rows(B, heads)
        tensors[f"{g}.weight.lora_a"] = A
        tensors[f"{g}.weight.lora_b"] = B

    alpha = np.float32(ad.scale * ad.rank)
    planned = GGUFLora(
        kv={
            "general.architecture": ("STRING", arch),
            "general.type": ("STRING", "adapter"),
            "adapter.type": ("STRING", "lora"),
            "adapter.lora.alpha": ("FLOAT32", float(alpha)),
        },
        tensors={k: tuple(reversed(v.shape)) for k, v in tensors.items()},
    )
    check_lora(planned, arch, base_tensors)

    out = check_out_file(out_path, overwrite)
    fallback = 0

    def write(tmp: Path) -> None:
        nonlocal fallback
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, x in tensors.items():
            data, raw = _encode(x, outtype)
            fallback += outtype == "q8_0" and raw is None
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        written = read_lora_file(tmp)
        check_lora(written, arch, base_tensors)
        if written.tensors != planned.tensors:
            raise UserError(f"{out}: tensors read back differ from what was written")

    atomic_write_with(out, write)  # disk full / read-only: one line, `out` untouched
    if fallback:
        print(
            f"note: {fallback} tensors with rows not a multiple of 32 were written as F16",
            file=sys.stderr,
        )
    return out
