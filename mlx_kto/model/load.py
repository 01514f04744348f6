"""Model loading, LoRA insertion, the adapter-off reference and adapter saving.

One copy of the weights: the policy is base + LoRA, the reference is the base
layers the LoRA modules wrap (or, when training starts from an adapter, that
adapter's frozen weights swapped back in), dropout off, no gradient.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

from mlx_kto.config.core import QUANT_GROUP_SIZES, KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.model.adapter_fit import mismatch_error
from mlx_kto.model.chat_template import set_chat_template
from mlx_kto.model.gguf import load_gguf
from mlx_kto.model.lmstudio import is_lmstudio_ref, resolve_lmstudio
from mlx_kto.model.lora_keys import expand_lora_keys
from mlx_kto.model.ollama import is_gguf_file, is_ollama_ref, provenance, resolve_ollama
from mlx_kto.runtime.atomic import (
    atomic_write_bytes,
    atomic_write_with,
    check_safetensors_size,
    write_errors,
)
from mlx_kto.runtime.qmatmul import use_blas_for_quantized

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

# mlx_lm is imported in the functions that use it (measured startup cost): any mlx_lm import
# loads transformers, ~1 s (2.5 s where torch is installed and not kept out), and every
# command imports this module at start; only the commands that load a model need it.

LORA_PARAM_NAMES = ("lora_a", "lora_b")


def resolve_model_path(model: str) -> Path:
    """A local folder or .gguf file, a model in the Ollama store (`ollama:NAME[:TAG]`: its
    GGUF blob) or LM Studio's (`lmstudio:PUBLISHER/MODEL`), or a hub id resolved through
    mlx-lm's downloader."""
    from mlx_lm.utils import _download

    if is_ollama_ref(model):
        return resolve_ollama(model).blob
    if is_lmstudio_ref(model):
        return resolve_lmstudio(model)
    p = Path(model).expanduser()
    if is_gguf_file(p):  # by suffix or magic (an Ollama blob has no suffix)
        if not p.is_file():
            raise UserError(f"model: {p}: no such GGUF file")
        return p
    if p.exists():
        if not (p / "config.json").exists():
            raise UserError(f"{p}: not a model folder (no config.json)")
        return p
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise UserError(f"--model (model): {model}: no such folder")
    if model.count("/") != 1:
        raise UserError(
            f"--model (model): '{model}' is neither a local folder nor a hub id (owner/name)"
        )
    try:
        return _download(model)
    except Exception as e:  # network, auth, missing repo: one line for the user
        raise UserError(
            f"--model (model): could not fetch '{model}' from the Hugging Face hub ({e})"
        ) from None


def load_base(cfg: KTOConfig, log=None):
    """Load model + tokenizer with mlx-lm (or a .gguf file, mlx_kto.model.gguf);
    apply --dtype and --quantize. On the CPU device a half-precision model computes in
    float32 unless --dtype says otherwise (sets cfg.dtype, so the reference fingerprint
    sees it). Returns (model, tokenizer, model_path, model_config)."""
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not cfg.model:
        raise UserError("--model (model): no model given (--model PATH_OR_HUB_ID)")
    path = resolve_model_path(cfg.model)
    if is_gguf_file(path):
        model, tokenizer, config = load_gguf(path, cfg.quantize, cfg.q_group_size, log=log)
        _set_template(tokenizer, cfg)
        cfg_dtype_from_device(cfg, model, log)
        if cfg.dtype:
            model.update(_cast_tree(model.parameters(), getattr(mx, cfg.dtype)))
        _blas_for_quantized(model, log)
        mx.eval(model.parameters())
        return model, tokenizer, path, config
    try:
        model, config = load_model(path, trust_remote_code=cfg.trust_remote_code)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (FileNotFoundError, ValueError, KeyError, AttributeError, TypeError) as e:
        # (a config.json that is not an object reaches mlx-lm as AttributeError/TypeError)
        raise UserError(f"{path}: mlx-lm cannot load this model ({e})") from None
    except RuntimeError as e:  # MLX's safetensors reader: truncated, garbage, empty
        raise UserError(f"{_bad_weights_file(path)}: unreadable weights ({e})") from None
    _set_template(tokenizer, cfg)
    cfg_dtype_from_device(cfg, model, log)
    if cfg.dtype:
        dt = getattr(mx, cfg.dtype)
        model.update(_cast_tree(model.parameters(), dt))
    if cfg.quantize:
        if "quantization" in config:
            raise UserError(f"--quantize (quantize): {cfg.model} is already quantized")
        check_group_size(model, cfg.q_group_size)
        model, config = quantize_model(model, config, cfg.q_group_size, cfg.quantize)
    _blas_for_quantized(model, log)
    mx.eval(model.parameters())
    return model, tokenizer, path, config


def check_group_size(model: nn.Module, group_size: int) -> None:
    """mlx-lm leaves a layer unquantized when its input size is not a multiple of the group
    size, without a word; refuse, naming a group size that fits every layer."""
    dims = {
        name: m.weight.shape[-1]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Embedding) and ".layers." in f".{name}"
    }
    bad = {n: d for n, d in dims.items() if d % group_size}
    if not bad:
        return
    fits = [g for g in QUANT_GROUP_SIZES if all(d % g == 0 for d in dims.values())]
    name, dim = next(iter(bad.items()))
    hint = f"use --q-group-size {max(fits)}" if fits else "no group size MLX supports fits"
    raise UserError(
        f"--q-group-size (q_group_size): {len(bad)} of {len(dims)} layers have an input size "
        f"that is not a multiple of {group_size} (e.g. {name}: {dim}) and would stay "
        f"unquantized; {hint}"
    )


def _bad_weights_file(folder: Path) -> Path:
    """The first *.safetensors in `folder` that MLX cannot read (else the folder)."""
    for f in sorted(folder.glob("*.safetensors")):
        try:
            mx.load(str(f))
        except (RuntimeError, ValueError, OSError):
            return f
    return folder


def check_lora_keys(model: nn.Module, keys: list[str] | None, num_layers: int) -> None:
    """Every --lora-keys entry must name a module, or mlx-lm drops it without a word.

    Keys are matched inside each adapted block, and `lm_head`-style keys at model level;
    a tied-embedding model has no lm_head module (the output reuses embed_tokens)."""
    if not keys:
        return
    blocks = model.layers[-max(num_layers, 0) :]
    in_blocks = {name for b in blocks for name, _ in b.named_modules()}
    top = {name for name, _ in model.named_modules()}
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    for key in keys:
        if key in in_blocks or key in top:
            continue
        if key.split(".")[-1] == "lm_head" and tied:
            raise UserError(
                f"--lora-keys (lora_keys): '{key}': this model ties its embeddings (the output "
                "head is embed_tokens), so there is no lm_head to adapt; drop it from the list"
            )
        some = sorted(n for n in in_blocks if n and "." in n)[:4]
        raise UserError(
            f"--lora-keys (lora_keys): '{key}' names no module of this model "
            f"(module paths inside a block look like {', '.join(some)})"
        )


def _set_template(tokenizer, cfg: KTOConfig) -> None:
    if getattr(cfg, "chat_template", None):  # --chat-template
        set_chat_template(tokenizer, cfg.chat_template)


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
    if n := use_blas_for_quantized(model):
        log(f"CPU device: {n} quantized layers multiply through BLAS (dequantized per call; "
            "MLX's CPU quantized kernel is ~8x slower; MLX_KTO_CPU_QMM=1 keeps it)")  # fmt: skip


def _cast_tree(tree, dtype):
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
        raise UserError(
            f"--num-layers (num_layers): {cfg.num_layers} > the model's {n_blocks} blocks"
        )
    cfg.lora_keys = expand_lora_keys(model, cfg.lora_keys)  # PEFT short names -> paths
    check_lora_keys(model, cfg.lora_keys, cfg.num_layers)
    linear_to_lora_layers(
        model, cfg.num_layers, lora_parameters(cfg), use_dora=cfg.fine_tune_type == "dora"
    )
    if not lora_modules(model):
        raise UserError(f"--lora-keys (lora_keys): {cfg.lora_keys} matched no layer of the model")
    refuse_embedding_lora(model, "--lora-keys (lora_keys)")
    return model


def refuse_embedding_lora(model: nn.Module, where: str) -> None:
    """LoRA on an embedding (mlx-lm's LoRAEmbedding) trains, but no converter (to-peft,
    to-gguf, fuse) can export it, so it is refused before any step is spent."""
    from mlx_lm.tuner.dora import DoRAEmbedding
    from mlx_lm.tuner.lora import LoRAEmbedding

    names = [n for n, m in model.named_modules() if isinstance(m, LoRAEmbedding | DoRAEmbedding)]
    if names:
        raise UserError(
            f"{where}: '{names[0]}' is an embedding; LoRA on embeddings cannot be exported "
            "(to-peft, to-gguf and fuse refuse it): adapt linear layers only"
        )


def lora_modules(model: nn.Module) -> list[nn.Module]:
    """Every module with LoRA weights (LoRALinear, LoRAEmbedding, LoRASwitchLinear)."""
    return [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]


def load_init_adapter(
    model: nn.Module, adapter_dir: str | Path, what: str = "--init-adapter"
) -> dict:
    """Load an mlx-lm adapter folder onto the model (LoRA layers are inserted).

    The adapter's own config decides the layers; returns its adapter_config. `what` is
    the flag that named the folder, for error messages."""
    from mlx_lm.tuner.utils import load_adapters

    adapter_dir = Path(adapter_dir)
    conf = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapters.safetensors"
    if not conf.is_file() or not weights.is_file():
        raise UserError(
            f"{what}: {adapter_dir} is not an mlx-lm adapter folder "
            "(needs adapters.safetensors and adapter_config.json)"
        )
    try:
        config = json.loads(conf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{what}: {conf} is not valid JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("lora_parameters"), dict):
        raise UserError(f"{what}: {conf} has no lora_parameters object")
    try:
        mx.load(str(weights))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"{what}: {weights} is unreadable ({e})") from None
    if config.get("fine_tune_type", "lora") not in ("lora", "dora"):
        raise UserError(
            f"{conf}: fine_tune_type '{config.get('fine_tune_type')}' is not supported; "
            "the reference must be recoverable by bypassing the adapter (a full fine-tune is not)"
        )
    model.freeze()
    try:
        load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise mismatch_error(what, adapter_dir, model, e) from None  # one line, both bases
    refuse_embedding_lora(model, f"init_adapter {conf}")
    return config


def trainable_lora(model: nn.Module) -> dict[str, mx.array]:
    """Flat dict of the trainable adapter weights (what adapters.safetensors holds)."""
    return dict(tree_flatten(model.trainable_parameters()))


def _base_of(module: nn.Module) -> nn.Module | None:
    """The wrapped base layer of a LoRA/DoRA module (`.linear` or `.embedding`), else None."""
    for name in ("linear", "embedding"):
        base = module.get(name) if isinstance(module, dict) else None
        if isinstance(base, nn.Module):
            return base
    return None


def _set_child(model: nn.Module, path: str, child: nn.Module) -> None:
    """Replace the module at dotted `path` (list items by index) with `child`."""
    *parents, last = path.split(".")
    parent = model
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    if isinstance(parent, list):
        parent[int(last)] = child
    else:
        setattr(parent, last, child)


@contextmanager
def reference_mode(model: nn.Module, frozen: dict[str, mx.array] | None = None):
    """Run `model` as the reference, in eval mode (no dropout); restores everything on exit.

    Without `frozen`: every LoRA/DoRA module is swapped for the base layer it wraps
    (`.linear` / `.embedding`, quantized or not), so the reference never reads the adapter's
    values: scaling them by 0 would not do, since 0 * NaN = NaN after a diverged step.
    With `frozen` (training from a starting adapter): those adapter weights replace the
    trained ones, so again nothing trained reaches the reference.
    Never call a function compiled outside this context from inside it (a compiled trace
    captures the module structure)."""
    was_training = model.training
    model.eval()
    if frozen is None:
        swapped = [
            (name, m, _base_of(m)) for name, m in model.named_modules() if hasattr(m, "lora_a")
        ]
        unknown = [name for name, _, base in swapped if base is None]
        if unknown:  # an adapter layer we cannot bypass: never let it leak into the reference
            model.train(was_training)
            raise ValueError(f"reference_mode: {unknown[0]} wraps no .linear / .embedding")
        for name, _, base in swapped:
            _set_child(model, name, base)
        try:
            yield model
        finally:
            for name, lora, _ in swapped:
                _set_child(model, name, lora)
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
    return tree_unflatten(list(flat.items()))


def all_finite(tree) -> bool:
    """True when every floating array of a tree (dict / list of arrays) is finite."""
    leaves = [v for _, v in tree_flatten(tree) if isinstance(v, mx.array)]
    checks = [mx.all(mx.isfinite(v)) for v in leaves if mx.issubdtype(v.dtype, mx.inexact)]
    return bool(mx.all(mx.stack(checks)).item()) if checks else True


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    """mx.save_safetensors through a temp file + rename (never a half-written file)."""

    def write(p):
        mx.save_safetensors(str(p), arrays, metadata=metadata or {})
        check_safetensors_size(p)  # MLX does not report a short write (disk full)

    atomic_write_with(path, write, suffix=".safetensors")


def model_reference(model: str | None) -> str | None:
    """How adapter_config.json names the base: a local path made absolute (a relative
    one breaks fuse/to-peft run from another folder and would land in PEFT's
    base_model_name_or_path), a hub id as typed."""
    if not model:  # a model handed to the Python API, loaded from who knows where
        return model
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def adapter_config(cfg: KTOConfig, base_model: str, num_layers: int) -> dict:
    """adapter_config.json as mlx-lm's load_adapters reads it, plus our settings."""
    return {
        "fine_tune_type": getattr(cfg, "fine_tune_type", "lora"),
        "num_layers": num_layers,
        "lora_parameters": lora_parameters(cfg),
        "model": model_reference(base_model),
        **provenance(base_model),  # an ollama: base: which blob its name meant
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
    """Write adapters.safetensors + adapter_config.json (mlx-lm's folder format). A
    non-finite adapter is never written; write errors are one line naming the file."""
    out_dir = Path(out_dir)
    weights = trainable_lora(model)
    target = out_dir / "adapters.safetensors"
    if not all_finite(weights):
        raise UserError(f"{target}: not saved: the adapter holds non-finite values (diverged)")
    with write_errors(target):
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(target, weights)
    with write_errors(out_dir / "adapter_config.json"):
        atomic_write_bytes(
            out_dir / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode()
        )
    return out_dir
