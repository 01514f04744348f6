"""GGUF base models (llama.cpp / Ollama / LM Studio files) as mlx-lm models.

What comes from where:
- config: the GGUF metadata (`{arch}.block_count`, ...), read by `gguf_reader.read_header`
  (scalar keys and tensor infos only, without gguf-py's seconds-long vocabulary parse) and
  mapped per architecture by `gguf_arch` (llama, qwen2, qwen3, gemma3, phi3);
- tokenizer: built from the file's own vocabulary metadata (`gguf_tokenizer`, no torch);
- weights: MLX's loader (`mx.load(file.gguf)`), which keeps Q4_0 / Q4_1 / Q8_0 packed as
  MLX affine quantization with group size 32 (`w = scale * q + bias`: Q4_1 is exactly that,
  Q4_0 is `d * (q - 8)` so bias = -8 d, Q8_0 is `d * q` with signed q so bias = -128 d).
  Those layers become mlx-lm QuantizedLinear / QuantizedEmbedding with the same bits: QLoRA
  trains on the quantized weights llama.cpp runs, bit for bit. F32 / F16 / BF16 stay as
  stored; every other type (Q4_K, Q6_K, Q5_0, ...) is dequantized exactly by gguf-py
  (float32 on the CPU device, float16 elsewhere) and can be re-quantized to MLX 4/8 bit
  (`requantize`). Files with a type MLX's loader cannot read at all (Q5_0, Q3_K, Q5_K,
  ...) are read from the memory-mapped file instead; their Q4_0 / Q4_1 / Q8_0 tensors are
  repacked into the same MLX layout (`pack_native`, checked against `mx.load` bit for bit).
- tensor names: gguf-py's HF <-> GGUF name map, inverted over the mlx-lm model's parameters;
  llama.cpp stores Llama-family attn_q / attn_k rows in interleaved-rope order, which is undone,
  and Gemma's norms as 1 + w, which is shifted back; rope factor tensors are config.
Anything that cannot be mapped is refused by name: architectures, tensors, rope scaling,
types gguf-py cannot dequantize.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_arch import ARCHES, CONFIG_TENSORS, read_arch_config
from mlx_kto.model.gguf_reader import MAPPING_VERSION, meta, read_header  # noqa: F401
from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

NATIVE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # kept quantized, group size 32
GROUP = 32


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


@dataclass
class GGUFBase:
    """A GGUF file read as an mlx-lm model: config, weights under mlx-lm names, report."""

    path: Path
    arch: str  # GGUF general.architecture
    config: dict  # mlx-lm config.json (with "quantization" when layers stay quantized)
    weights: dict[str, mx.array]  # mlx-lm parameter names (quantized: weight/scales/biases)
    types: dict[str, str]  # GGUF tensor name -> GGML type name
    dequantized: list[str] = field(default_factory=list)  # mlx module paths made float
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (file, loaded) B

    def report(self) -> list[str]:
        """One line per GGML type: how many tensors, what happened to them, and for the
        dequantized ones the memory that costs (bytes in the file -> as floats)."""
        lines = []
        for typ, n in sorted(Counter(self.types.values()).items()):
            if typ in NATIVE_BITS:
                what = f"kept quantized (MLX {NATIVE_BITS[typ]}-bit affine, group size {GROUP})"
            elif typ in ("F32", "F16", "BF16"):
                what = "loaded as floats"
            else:
                names = [k for k, t in self.types.items() if t == typ]
                file_b = sum(self.sizes[k][0] for k in names if k in self.sizes)
                mem_b = sum(self.sizes[k][1] for k in names if k in self.sizes)
                what = (
                    f"dequantized to floats (gguf-py): {mib(file_b)} in the file, "
                    f"{mib(mem_b)} in memory (--quantize 4 re-quantizes them)"
                )
            lines.append(f"{typ}: {n} tensors {what}")
        return lines


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def params_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def read_config(path: Path, reader=None) -> dict:
    """mlx-lm config.json from a GGUF file's metadata (model/gguf_arch.py: per architecture,
    every value checked; the tests check it against transformers' GGUF config reader)."""
    reader = reader or read_header(path)
    if meta(reader, "general.type", "model") != "model":
        raise UserError(f"{path}: general.type is {meta(reader, 'general.type')!r}, not a model")
    return read_arch_config(path, reader, {t.name: t for t in reader.tensors})


def _lazy_model(config: dict) -> nn.Module:
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if config.get("tie_word_embeddings") and hasattr(model, "sanitize"):
        model.sanitize({})  # mlx-lm's rule for a checkpoint without lm_head.weight (gemma3)
    return model


def name_map(config: dict, arch: str, model: nn.Module) -> dict[str, str]:
    """GGUF tensor name -> mlx-lm parameter name, from gguf-py's HF -> GGUF map applied to
    every parameter of the mlx-lm model (whose names are the Hugging Face ones)."""
    import gguf

    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(enum, config["num_hidden_layers"])
    out = {}
    for name, _ in tree_flatten(model.parameters()):
        module, _, leaf = name.rpartition(".")
        g = tmap.get_name(module)
        if g is not None:
            out[f"{g}.{leaf}"] = name
    return out


def _unpermute(x, n_head: int):
    """ggml interleaved-rope rows -> HF rotate-half rows (inverse of llama.cpp's permute);
    a row permutation, so it applies to packed weights, scales and biases alike."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def pack_native(data: np.ndarray, typ: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 / Q4_1 / Q8_0 blocks (uint8 [rows, bytes]) -> MLX affine (weight uint32
    [rows, cols*bits/32], scales and biases float16 [rows, cols/32]), as mx.load makes them.
    Block layouts (ggml-common.h): Q8_0 = d, int8 q[32]; Q4_0 = d, nibbles; Q4_1 = d, m,
    nibbles, element j in the low nibble of byte j and element j+16 in its high nibble."""
    rows = data.shape[0]
    head = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}[typ]
    size = head + (GROUP if typ == "Q8_0" else GROUP // 2)
    blocks = data.reshape(rows, -1, size)  # [rows, n_blocks, block bytes]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # [rows, n_blocks]
    qs = blocks[..., head:]
    if typ == "Q8_0":
        q = (qs.view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # [rows, nb, 32]
        weight = q.reshape(rows, -1).view(np.uint32)  # 4 per word, element 0 lowest
        return weight, d, (d * np.float16(-128)).astype(np.float16)
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(rows, -1, 8).astype(np.uint32)
    weight = (q << (4 * np.arange(8, dtype=np.uint32))).sum(axis=-1, dtype=np.uint32)
    bias = blocks[..., 2:4].copy().view(np.float16)[..., 0] if typ == "Q4_1" else d * -8
    return weight, d, bias.astype(np.float16)


def _dequantize(t) -> np.ndarray:
    import gguf

    try:
        return gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(
            f"tensor '{t.name}': GGML type {t.tensor_type.name} cannot be dequantized by gguf-py"
        ) from None


def read_gguf(path: str | Path, float_dtype: mx.Dtype | None = None) -> GGUFBase:
    """Read a GGUF file's config and weights under mlx-lm names (see the module docstring).
    `float_dtype`: dtype of dequantized tensors (default float32 on CPU, float16 elsewhere)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    reader = read_header(path)
    config = read_config(path, reader)
    arch = meta(reader, "general.architecture")
    spec = ARCHES[arch]
    if float_dtype is None:
        float_dtype = mx.float32 if mx.default_device() == mx.cpu else mx.float16
    model = _lazy_model(config)
    names = name_map(config, arch, model)
    expected = dict(tree_flatten(model.parameters()))
    tensors = [t for t in reader.tensors if t.name not in CONFIG_TENSORS]  # (read as config)
    types = {t.name: t.tensor_type.name for t in tensors}
    unmapped = [n for n in types if n not in names]
    if unmapped:
        more = f" (and {len(unmapped) - 3} more)" if len(unmapped) > 3 else ""
        raise UserError(
            f"{path}: GGUF tensors with no mlx-lm {config['model_type']} parameter: "
            + ", ".join(unmapped[:3])
            + more
        )
    try:
        loaded = mx.load(
            str(path), format="gguf"
        )  # packed Q4_0/Q4_1/Q8_0; format: an Ollama blob has no suffix
    except Exception:  # a type MLX cannot read (Q5_0, Q3_K, ...): gguf-py for all tensors
        loaded = None
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    weights, quant, dequantized, sizes = {}, {}, [], {}
    for t in tensors:
        typ, target = types[t.name], names[t.name]
        module = target.rpartition(".")[0]
        if typ in NATIVE_BITS:
            if loaded is not None:
                stem = t.name[: -len(".weight")]
                parts = (loaded[t.name], loaded[f"{stem}.scales"], loaded[f"{stem}.biases"])
            else:
                parts = tuple(mx.array(a) for a in pack_native(np.asarray(t.data), typ))
            quant[module] = {"group_size": GROUP, "bits": NATIVE_BITS[typ]}
        elif typ == "F32" or typ == "F16":
            parts = (loaded[t.name] if loaded is not None else mx.array(np.asarray(t.data)),)
        else:
            x = mx.array(_dequantize(t))  # exact float32 values
            parts = (x.astype(mx.bfloat16) if typ == "BF16" else x.astype(float_dtype),)
            if typ != "BF16" and module not in dequantized:
                dequantized.append(module)
        if spec.permute_qk and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if "attn_q" in t.name else n_kv
            parts = tuple(_unpermute(p, heads) for p in parts)
        if spec.norm_shift and t.name.endswith("norm.weight"):  # 1 + w stored, w expected
            parts = (parts[0] - spec.norm_shift,)  # exact in float32 (w + 1 was rounded)
        want = tuple(expected[target].shape)
        got = tuple(parts[0].shape)
        if typ in NATIVE_BITS:  # packed uint32 columns -> the float matrix's columns
            got = got[:-1] + (got[-1] * 32 // NATIVE_BITS[typ],)
        if got != want:
            raise UserError(f"{path}: tensor '{t.name}' has shape {got}, mlx-lm expects {want}")
        sizes[t.name] = (int(t.data.nbytes), sum(int(p.nbytes) for p in parts))
        weights[target] = parts[0]
        if len(parts) == 3:
            weights[f"{module}.scales"], weights[f"{module}.biases"] = parts[1], parts[2]
    missing = [n for n in expected if n not in weights]
    if missing:
        raise UserError(f"{path}: no GGUF tensor for mlx-lm parameters {', '.join(missing[:3])}")
    if quant:
        bits = Counter(q["bits"] for q in quant.values()).most_common(1)[0][0]
        qconf = {"group_size": GROUP, "bits": bits, "mode": "affine"}
        qconf.update({m: {**q, "mode": "affine"} for m, q in quant.items() if q["bits"] != bits})
        config["quantization"] = qconf
        config["quantization_config"] = qconf
    return GGUFBase(path, arch, config, weights, types, dequantized, sizes)


def build_model(base: GGUFBase) -> nn.Module:
    """The mlx-lm model of `base`, its natively quantized layers as quantized MLX layers."""
    model = _lazy_model(base.config)
    q = base.config.get("quantization")
    if q:

        def predicate(p, m):
            if p in q:
                return q[p]
            return hasattr(m, "to_quantized") and f"{p}.scales" in base.weights

        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=predicate)
    model.load_weights(list(base.weights.items()), strict=True)
    model.eval()
    return model


def requantize(model: nn.Module, base: GGUFBase, bits: int, group_size: int) -> list[str]:
    """Quantize the dequantized layers (not the natively quantized ones) to MLX `bits`;
    records them in base.config["quantization"]; returns their module paths."""
    todo = set(base.dequantized)

    def predicate(p, m):
        ok = p in todo and hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0
        return {"group_size": group_size, "bits": bits, "mode": "affine"} if ok else False

    done = [p for p, m in model.named_modules() if predicate(p, m)]
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    qconf = base.config.setdefault("quantization", {"group_size": group_size, "bits": bits})
    for p in done:
        qconf[p] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    base.config["quantization_config"] = qconf
    return done


def requantize_line(path, model: nn.Module, base: GGUFBase, bits: int, group_size: int) -> str:
    """`requantize`, and the log line saying what it did to the model's memory."""
    before = params_bytes(model)
    done = requantize(model, base, bits, group_size)
    return (
        f"{Path(path).name}: re-quantized {len(done)} dequantized layers to MLX {bits}-bit "
        f"(group size {group_size}): weights {mib(before)} -> {mib(params_bytes(model))}"
    )


def load_gguf(
    path: str | Path,
    quantize: int | None = None,
    q_group_size: int = 64,
    float_dtype: mx.Dtype | None = None,
    log=print,
):
    """(model, tokenizer, config) for a GGUF file, the way mlx-lm loads a folder; logs
    what happened to each GGML type once. `quantize`: re-quantize dequantized layers."""
    base = read_gguf(path, float_dtype)
    model = build_model(base)
    for line in base.report():
        log(f"{Path(path).name}: {line}")
    if quantize:
        log(requantize_line(path, model, base, quantize, q_group_size))
    tokenizer = load_gguf_tokenizer(base.path, base.config.get("eos_token_id"))
    mx.eval(model.parameters())
    return model, tokenizer, base.config
