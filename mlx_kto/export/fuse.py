"""Fuse an adapter into its base and save a Hugging Face safetensors checkpoint.

Per LoRA'd Linear, in float32 (a quantized base is dequantized first):
    LoRA:  W' = W + s * lora_b.T @ lora_a.T                      (mlx-lm LoRALinear.fuse)
    DoRA:  W' = m / ||W + s * lora_b.T @ lora_a.T||_row * (W + s * lora_b.T @ lora_a.T)
Only then is W' cast to the output dtype, and a cast that would erase most of the
adapter's change is refused (mlx-lm casts the delta first and re-quantizes, which can
drop a small adapter silently: ml-explore/mlx-lm#1172).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import atomic_write, atomic_write_json, check_out_file, make_parent
from mlx_kto.export.adapters import read_adapter
from mlx_kto.export.base import check_adapter, checkpoint_names, load_base
from mlx_kto.export.tokenizer_files import copy_tokenizer_files
from mlx_kto.runtime.atomic import chmod_like_new, clean_stale_temps, temp_path, write_error

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MIN_RETAINED = 0.5  # refuse a cast keeping less than half of the adapter's change


def _weight_f32(linear: nn.Module) -> mx.array:
    """The base weight [out, in] in float32 (dequantized if quantized)."""
    if isinstance(linear, nn.QuantizedLinear):
        w = mx.dequantize(
            linear.weight,
            linear.scales,
            linear.biases,
            group_size=linear.group_size,
            bits=linear.bits,
            mode=linear.mode,
        )
        return w.astype(mx.float32)
    return linear.weight.astype(mx.float32)


def fused_weight(module: nn.Module) -> tuple[mx.array, mx.array]:
    """(W' in float32, W in float32) for an mlx-lm LoRALinear or DoRALinear."""
    from mlx_lm.tuner.dora import DoRALinear

    w = _weight_f32(module.linear)  # [out, in]
    a = module.lora_a.astype(mx.float32)  # [in, r]
    b = module.lora_b.astype(mx.float32)  # [r, out]
    fused = w + module.scale * (b.T @ a.T)
    if isinstance(module, DoRALinear):
        norm = mx.linalg.norm(fused, axis=1)  # [out]
        fused = (module.m.astype(mx.float32) / norm)[:, None] * fused
    return fused, w


def retained(fused: mx.array, w: mx.array, dtype: mx.Dtype) -> float:
    """Share of the change `fused - w` that survives casting to `dtype`: the projection
    <cast(fused) - cast(w), d> / <d, d>; 1.0 when nothing is lost, ~0 when rounding
    erases it."""
    d = fused - w
    dd = mx.sum(d * d).item()
    if dd == 0.0:
        return 1.0
    kept = fused.astype(dtype).astype(mx.float32) - w.astype(dtype).astype(mx.float32)
    return mx.sum(kept * d).item() / dd


def fuse(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dequantize: bool = False,
    dtype: str | None = None,
    gguf: str | Path | None = None,
    llama_cpp_dir: str | Path | None = None,
    gguf_outtype: str = "f16",
    overwrite: bool = False,
) -> Path:
    """Fuse the adapter at `adapter_dir` into `base` (default: the adapter's `model`) and
    write a Hugging Face checkpoint (config.json with `architectures`, safetensors
    weights, tokenizer files) to `out_dir`.

    `dtype` is the output dtype (float32/float16/bfloat16; default: the base's float dtype).
    A quantized base needs `dequantize=True`: re-quantizing would blur the adapter and
    transformers cannot read MLX quantization. With `gguf` and `llama_cpp_dir`, the
    checkpoint is also converted by that llama.cpp checkout's convert_hf_to_gguf.py.
    """
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import dequantize_model, load

    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if gguf is not None and llama_cpp_dir is None:
        raise UserError("--gguf needs --llama-cpp-dir (a llama.cpp checkout)")
    script = None
    if llama_cpp_dir is not None:
        script = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise UserError(f"--llama-cpp-dir {llama_cpp_dir}: no convert_hf_to_gguf.py there")
        if gguf is None:
            raise UserError("--llama-cpp-dir given without --gguf OUT.gguf")

    if gguf is not None:  # llama.cpp writes it: check it now, not after the fuse
        check_out_file(gguf, overwrite)
    ad = read_adapter(adapter_dir)
    base_ref = base or ad.model
    if not base_ref:
        raise UserError(f"{adapter_dir}: adapter_config.json has no 'model'; pass --base")
    info = load_base(base_ref)
    check_adapter(ad, info, where=str(adapter_dir))
    if info.quantized and not dequantize:
        raise UserError(
            f"base '{base_ref}' is quantized: pass --dequantize (fuses in float32 and writes "
            "a float checkpoint; re-quantizing would blur the adapter)"
        )
    if not info.config.get("architectures"):
        raise UserError(f"{info.path / 'config.json'}: no 'architectures' (transformers needs it)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (pass --overwrite to write into it)")
    if out.resolve() in (info.path.resolve(), Path(adapter_dir).resolve()):
        raise UserError(f"{out}: is the base or adapter folder; choose another output")

    try:
        model, tokenizer = load(str(info.path))
    except RuntimeError as e:  # MLX's safetensors reader: truncated or garbage weights
        raise UserError(f"--base {info.path}: unreadable weights ({e})") from None
    try:
        load_adapters(model, str(adapter_dir))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{adapter_dir}: adapter cannot be loaded onto the base ({e})") from None
    float_dtype = None
    fused = []
    worst = (1.0, "")
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear | DoRALinear):
            continue
        w_new, w_old = fused_weight(mod)
        lin = mod.linear
        if float_dtype is None:
            float_dtype = (
                lin.scales.dtype if isinstance(lin, nn.QuantizedLinear) else lin.weight.dtype
            )
        target = DTYPES[dtype] if dtype else float_dtype
        if target != mx.float32:
            kept = retained(w_new, w_old, target)
            worst = min(worst, (kept, name))
        has_bias = "bias" in lin
        new = nn.Linear(w_new.shape[1], w_new.shape[0], bias=has_bias)
        new.weight = w_new.astype(target)
        if has_bias:
            new.bias = lin.bias.astype(target)
        fused.append((name, new))
    if worst[0] < MIN_RETAINED:
        raise UserError(
            f"casting the fused weights to {dtype or str(float_dtype).split('.')[-1]} keeps only "
            f"{worst[0]:.0%} of the adapter's change in '{worst[1]}'; pass --dtype float32"
        )
    model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {
            k: v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }

    # The fused names must be the base checkpoint's (quantization leaves stripped), or
    # the family's mlx-lm names differ from Hugging Face's and transformers would not load it.
    stored = {
        n
        for n in checkpoint_names(info.path)
        if not n.endswith((".scales", ".biases")) and "rotary_emb.inv_freq" not in n
    }
    if stored and set(weights) != stored:
        diff = sorted(set(weights) ^ stored)[:3]
        raise UserError(
            f"fused weight names differ from the base checkpoint's ({', '.join(diff)}); "
            f"model type '{info.model_type}' cannot be exported as a Hugging Face checkpoint"
        )

    config = {
        k: v for k, v in info.config.items() if k not in ("quantization", "quantization_config")
    }
    out_dtype = {v: k for k, v in DTYPES.items()}.get(DTYPES[dtype] if dtype else float_dtype)
    if out_dtype:
        config["torch_dtype"] = out_dtype
        if "dtype" in config:
            config["dtype"] = out_dtype

    make_parent(out)
    clean_stale_temps(out)
    tmp = temp_path(out)
    try:
        tmp.mkdir()  # 0777 & ~umask (mkdtemp would make the published folder 0700)
        _save_checkpoint(tmp, weights, config, tokenizer, info.path)
        for f in tmp.rglob("*"):  # MLX writes 0644 whatever the umask
            chmod_like_new(f, folder=f.is_dir())
        if not out.exists():
            os.replace(tmp, out)  # the whole folder appears at once
        else:  # --overwrite: replace our files; of the rest, drop only stale weight files
            new = {f.name for f in tmp.iterdir()}
            for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
                if old.is_file() and old.name not in new:
                    old.unlink()  # a stale shard or index would be loaded with the new weights
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    if gguf is not None:
        _run_llama_cpp(script, out, Path(gguf), gguf_outtype)
    return out


def _save_checkpoint(dst: Path, weights: dict, config: dict, tokenizer, src: Path) -> None:
    """Hugging Face layout: shards with {"format": "pt"} metadata (+ index when more than
    one), config.json, the base's tokenizer files as they are, generation_config.json."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    if len(shards) == 1:
        mx.save_safetensors(str(dst / "model.safetensors"), shards[0], metadata={"format": "pt"})
    else:
        index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}}
        index["weight_map"] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            mx.save_safetensors(str(dst / fname), shard, metadata={"format": "pt"})
            index["weight_map"].update({k: fname for k in shard})
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        atomic_write_json(dst / "model.safetensors.index.json", index)
    atomic_write_json(dst / "config.json", config)
    if not copy_tokenizer_files(src, dst):  # the base's own files, unchanged
        tokenizer.save_pretrained(str(dst))
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)


def _run_llama_cpp(script: Path, hf_dir: Path, gguf_path: Path, outtype: str) -> None:
    """Convert the fused checkpoint with the user's llama.cpp convert_hf_to_gguf.py (it
    needs torch, transformers and numpy in this Python; see docs/convert.md)."""

    def convert(tmp: Path) -> None:  # into a temp file: a failed run leaves no half GGUF
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp)]
        cmd += ["--outtype", outtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"{script} failed (exit {proc.returncode}): {tail[0]}")
        if not tmp.is_file():
            raise UserError(f"{script} exited 0 but wrote no {gguf_path}")

    atomic_write(gguf_path, convert, suffix=".gguf")
