"""Model loading, LoRA insertion, the adapter-off reference and adapter saving.

One copy of the weights: the policy is base + LoRA, the reference is the same
modules with LoRA switched off (or, when training starts from an adapter, with
that adapter's frozen weights swapped back in), dropout off, no gradient.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlx_kto.config import KTOConfig
from mlx_kto.errors import UserError

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

LORA_PARAM_NAMES = ("lora_a", "lora_b")


def resolve_model_path(model: str) -> Path:
    """A local folder or .gguf file, or a hub id resolved through mlx-lm's downloader."""
    from mlx_lm.utils import _download

    p = Path(model).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise UserError(f"model: {p}: no such GGUF file")
        return p
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a model folder (no config.json)")
        return p
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model: '{model}' is neither a local folder nor a hub id (owner/name)")
    try:
        return _download(model)
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise UserError(
            f"model: could not fetch '{model}' from the Hugging Face hub ({e})"
        ) from None


def load_base(cfg: KTOConfig, log=None):
    """Load model + tokenizer with mlx-lm (or a .gguf file, mlx_kto.convert.gguf_base);
    apply --dtype and --quantize. On the CPU device a half-precision model computes in
    float32 unless --dtype says otherwise (sets cfg.dtype, so the reference fingerprint
    sees it). Returns (model, tokenizer, model_path, model_config)."""
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.model:
        raise UserError("model: no model given (--model PATH_OR_HUB_ID)")
    path = resolve_model_path(cfg.model)
    if path.suffix.lower() == ".gguf":
        from mlx_kto.convert.gguf_base import load_gguf

        model, tokenizer, config = load_gguf(path, cfg.quantize, cfg.q_group_size, log=log)
        cfg_dtype_from_device(cfg, model, log)
        if cfg.dtype:
            model.update(_cast_tree(model.parameters(), getattr(mx, cfg.dtype)))
        _blas_for_quantized(model, log)
        mx.eval(model.parameters())
        return model, tokenizer, path, config
    try:
        model, config = load_model(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UserError(f"{path}: mlx-lm cannot load this model ({e})") from None
    cfg_dtype_from_device(cfg, model, log)
    if cfg.dtype:
        dt = getattr(mx, cfg.dtype)
        model.update(_cast_tree(model.parameters(), dt))
    if cfg.quantize:
        if "quantization" in config:
            raise UserError(f"quantize: {cfg.model} is already quantized")
        model, config = quantize_model(model, config, cfg.q_group_size, cfg.quantize)
    _blas_for_quantized(model, log)
    mx.eval(model.parameters())
    return model, tokenizer, path, config


def cfg_dtype_from_device(cfg: KTOConfig, model: nn.Module, log) -> None:
    """On MLX's CPU backend float16/bfloat16 matmuls do not use BLAS (>10x slower than
    float32): with no --dtype, a model with half-precision weights computes in float32
    there (quantized weights stay packed; their scales/biases become float32)."""
    if cfg.dtype or mx.default_device() != mx.cpu:
        return
    half = {mx.float16, mx.bfloat16}
    if any(v.dtype in half for _, v in tree_flatten(model.parameters())):
        cfg.dtype = "float32"
        log("CPU device: computing in float32 (half-precision matmuls are slow on MLX's CPU "
            "backend; --dtype overrides)")  # fmt: skip


def load_gguf_for_inference(path: Path, adapter_path: str | None = None, log=None):
    """(model, tokenizer) of a .gguf base plus an optional mlx-lm adapter, in eval mode:
    what `mlx_lm.load(folder, adapter_path=...)` gives for a folder."""
    from mlx_kto.convert.gguf_base import load_gguf

    from mlx_lm.tuner.utils import load_adapters

    log = log or (lambda msg: print(msg, file=sys.stderr))
    model, tokenizer, _ = load_gguf(path, log=log)
    cfg = KTOConfig()
    cfg_dtype_from_device(cfg, model, log)
    if cfg.dtype:
        model.update(_cast_tree(model.parameters(), getattr(mx, cfg.dtype)))
    _blas_for_quantized(model, log)
    if adapter_path:
        model = load_adapters(model, str(adapter_path))
    model.eval()
    return model, tokenizer


def _blas_for_quantized(model: nn.Module, log) -> None:
    from mlx_kto.qmatmul import use_blas_for_quantized

    if n := use_blas_for_quantized(model):
        log(f"CPU device: {n} quantized layers multiply through BLAS (dequantized per call; "
            "MLX's CPU quantized kernel is ~8x slower; MLX_KTO_CPU_QMM=1 keeps it)")  # fmt: skip


def _cast_tree(tree, dtype):
    from mlx.utils import tree_map

    return tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, tree)


def lora_parameters(cfg: KTOConfig) -> dict:
    """The `lora_parameters` block of mlx-lm's adapter_config.json."""
    params = {"rank": cfg.lora_rank, "scale": cfg.scale, "dropout": cfg.lora_dropout}
    if cfg.lora_keys:
        params["keys"] = list(cfg.lora_keys)
    return params


def apply_lora(model: nn.Module, cfg: KTOConfig) -> nn.Module:
    """Freeze the base and insert LoRA layers (mlx-lm's linear_to_lora_layers)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    mx.random.seed(cfg.seed)
    n_blocks = len(model.layers)
    if cfg.num_layers > n_blocks:
        raise UserError(f"num_layers: {cfg.num_layers} > the model's {n_blocks} blocks")
    linear_to_lora_layers(model, cfg.num_layers, lora_parameters(cfg))
    if not lora_modules(model):
        raise UserError(f"lora_keys: {cfg.lora_keys} matched no layer of the model")
    return model


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with LoRA weights (LoRALinear, LoRAEmbedding, LoRASwitchLinear)."""
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


def load_init_adapter(model: nn.Module, adapter_dir: str | Path) -> dict:
    """Load an mlx-lm adapter folder onto the (already LoRA-fied) model.

    The adapter's own config decides the layers; returns its adapter_config."""
    from mlx_lm.tuner.utils import load_adapters

    adapter_dir = Path(adapter_dir)
    conf = adapter_dir / "adapter_config.json"
    if not conf.exists() or not (adapter_dir / "adapters.safetensors").exists():
        raise UserError(
            f"init_adapter: {adapter_dir} is not an mlx-lm adapter folder "
            "(needs adapters.safetensors and adapter_config.json)"
        )
    config = json.loads(conf.read_text())
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(
            f"{conf}: fine_tune_type '{config.get('fine_tune_type')}' is not supported; "
            "the reference must be recoverable by switching LoRA off (DoRA/full are not)"
        )
    model.freeze()
    try:
        load_adapters(model, str(adapter_dir))
    except ValueError as e:
        raise UserError(f"{adapter_dir}: adapter does not match the model ({e})") from None
    return config


def trainable_lora(model: nn.Module) -> dict[str, mx.array]:
    """Flat dict of the trainable adapter weights (what adapters.safetensors holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


@contextmanager
def reference_mode(model: nn.Module, frozen: dict[str, mx.array] | None = None):
    """Run `model` as the reference: LoRA off (scale 0) or, if `frozen` adapter
    weights are given, those weights in place of the trained ones; eval mode (no
    dropout). Restores everything on exit. Never call a function compiled
    outside this context from inside it (a compiled trace captures `scale`)."""
    mods = lora_modules(model)
    was_training = model.training
    model.eval()
    if frozen is None:
        scales = [m.scale for m in mods]
        for m in mods:
            m.scale = 0.0
        try:
            yield model
        finally:
            for m, s in zip(mods, scales):
                m.scale = s
            model.train(was_training)
    else:
        current = trainable_lora(model)
        model.update(_unflatten(frozen))
        try:
            yield model
        finally:
            model.update(_unflatten(current))
            model.train(was_training)


def _unflatten(flat: dict[str, mx.array]):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    """mx.save_safetensors through a temp file + rename (never a half-written file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".safetensors")
    os.close(fd)
    try:
        mx.save_safetensors(tmp, arrays, metadata=metadata or {})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_config(cfg: KTOConfig, base_model: str, num_layers: int) -> dict:
    """adapter_config.json as mlx-lm's load_adapters reads it, plus our settings."""
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(cfg),
        "model": base_model,
        "trainer": "mlx_kto",
        "kto": {
            "loss_type": cfg.loss_type,
            "beta": cfg.beta,
            "desirable_weight": cfg.desirable_weight,
            "undesirable_weight": cfg.undesirable_weight,
            "max_length": cfg.max_length,
            "quantize": cfg.quantize,
        },
    }


def save_adapter(model: nn.Module, out_dir: str | Path, config: dict) -> Path:
    """Write adapters.safetensors + adapter_config.json (mlx-lm's folder format)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out_dir / "adapters.safetensors", trainable_lora(model))
    atomic_write_bytes(
        out_dir / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode()
    )
    return out_dir
