"""A PEFT `LoraConfig` (or the dict of one) as KTOConfig's LoRA fields, for
`KTOTrainer(peft_config=...)` as TRL takes it.

    r -> lora_rank, lora_alpha -> lora_alpha (scale = alpha / r; use_rslora: alpha / sqrt(r)),
    target_modules -> lora_keys ("all-linear": every linear layer of every block; None:
    PEFT's default for Llama-style models, q_proj and v_proj), use_dora -> fine_tune_type.

`lora_dropout` is not applied, as in TRL: its `disable_dropout` (default true) zeroes every
dropout after wrapping the model; `KTOConfig(lora_dropout=...)` trains with one. Any other
setting that switches something on (bias, modules_to_save, rank_pattern, layers_to_transform,
a non-default init, ...) is refused by name: the adapter could not be what it describes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mlx_kto.config.translators import shape, suggest
from mlx_kto.errors import UserError

# Set when a LoraConfig is built; they describe the config, not the adapter.
_METADATA = {
    "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "megatron_core",
    "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# Settings that must stay off (None, False, empty), with what to do instead.
_OFF = {
    "bias": "the adapter has no bias terms (bias='none')",
    "modules_to_save": "only LoRA matrices are trained",
    "layers_to_transform": "LoRA goes on the last num_layers blocks (KTOConfig num_layers)",
    "layers_pattern": "LoRA goes on the last num_layers blocks (KTOConfig num_layers)",
    "rank_pattern": "one rank for every module (r)",
    "alpha_pattern": "one alpha for every module (lora_alpha)",
    "exclude_modules": "list the modules to adapt in target_modules",
    "fan_in_fan_out": "MLX linear layers are (out, in)",
    "trainable_token_indices": "embeddings are not trained",
    "target_parameters": "LoRA wraps linear modules",
    "lora_bias": "the adapter has no bias terms",
    "layer_replication": "the model's layers are used as they are",
    "use_qalora": "QLoRA here is a quantized base (KTOConfig quantize) with a float adapter",
    "megatron_config": "no Megatron layers",
    "loftq_config": "the adapter starts at zero",
    "eva_config": "the adapter starts at zero",
    "corda_config": "the adapter starts at zero",
    "lora_ga_config": "the adapter starts at zero",
    "velora_config": "plain LoRA or DoRA only",
    "monteclora_config": "plain LoRA or DoRA only",
    "arrow_config": "plain LoRA or DoRA only",
    "kasa_config": "plain LoRA or DoRA only",
    "alora_invocation_tokens": "plain LoRA or DoRA only",
    "use_bdlora": "plain LoRA or DoRA only",
    "inference_mode": "an inference-mode config trains nothing",
}
_MAPPED = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora")
_CHECKED = ("peft_type", "task_type", "init_lora_weights")
KNOWN = set(_MAPPED) | set(_CHECKED) | set(_OFF) | _METADATA
_PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": None}


def _as_dict(peft_config: Any) -> tuple[dict, bool]:
    """(settings, from a PEFT object) of a LoraConfig, a dict or a dataclass."""
    if isinstance(peft_config, dict):
        return dict(peft_config), False
    if hasattr(peft_config, "to_dict"):
        return dict(peft_config.to_dict()), True
    if dataclasses.is_dataclass(peft_config):
        return dataclasses.asdict(peft_config), True
    raise UserError(
        f"peft_config: expected a peft LoraConfig or a dict of its fields, got "
        f"{type(peft_config).__name__}"
    )


def _plain(value: Any) -> Any:
    """A PEFT enum (PeftType.LORA, TaskType.CAUSAL_LM) as its string."""
    return getattr(value, "value", value)


def _target_modules(value: Any) -> tuple[list[str] | None, str]:
    if value is None:
        return ["q_proj", "v_proj"], "PEFT's default for Llama-style models (q_proj, v_proj)"
    if value == "all-linear":
        return None, "every linear layer of every block"
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        keys = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        return keys, ", ".join(keys)
    raise UserError(
        f"peft_config: target_modules {value!r} is not supported: give a list of module names "
        "(q_proj, v_proj, ...) or 'all-linear' (a regular expression is not matched here)"
    )


def lora_fields(peft_config: Any) -> tuple[dict, list[str]]:
    """({KTOConfig field: value}, notes) for a LoraConfig / dict (see the module docstring);
    UserError naming the setting for what the adapter here cannot be."""
    settings, from_peft = _as_dict(peft_config)
    for key, value in settings.items():
        if key not in KNOWN and not from_peft:
            raise UserError(f"peft_config: unknown LoRA setting '{key}'{suggest(key, KNOWN)}")
        if key in _OFF or (key not in KNOWN and from_peft):
            if value in (None, False, {}, [], (), "none"):
                continue
            why = _OFF.get(key, "not supported by this trainer")
            raise UserError(f"peft_config: {key}={value!r} is not supported: {why}")
    peft_type = str(_plain(settings.get("peft_type", "LORA")))
    if peft_type.upper() != "LORA":
        raise UserError(
            f"peft_config: a {peft_type} config; mlx-kto trains LoRA (or DoRA) adapters"
        )
    task = _plain(settings.get("task_type"))
    if task not in (None, "CAUSAL_LM"):
        raise UserError(
            f"peft_config: task_type {task!r}: only CAUSAL_LM (a causal language model)"
        )
    if settings.get("init_lora_weights", True) is not True:
        raise UserError(
            f"peft_config: init_lora_weights={settings['init_lora_weights']!r} is not supported: "
            "the adapter starts at zero (random A, zero B), as init_lora_weights=True"
        )
    s = {**_PEFT_DEFAULTS, **settings}
    for key in ("r", "lora_alpha"):
        if isinstance(s[key], bool) or not isinstance(s[key], (int, float)) or s[key] <= 0:
            raise UserError(f"peft_config: {key} must be a positive number, got {shape(s[key])}")
    keys, where = _target_modules(s["target_modules"])
    out = {"lora_rank": s["r"], "lora_alpha": float(s["lora_alpha"]), "lora_keys": keys}
    out["lora_scale"] = None  # alpha / r, as PEFT scales
    notes = [f"r -> lora_rank {s['r']}", f"lora_alpha -> lora_alpha {s['lora_alpha']}"]
    if s.get("use_rslora"):
        out["lora_scale"] = s["lora_alpha"] / math.sqrt(s["r"])
        notes.append(f"use_rslora -> lora_scale {out['lora_scale']:g} (alpha / sqrt(r))")
    out["fine_tune_type"] = "dora" if s.get("use_dora") else "lora"
    notes.append(f"target_modules -> {where}")
    if s["lora_dropout"]:
        notes.append(
            f"lora_dropout {s['lora_dropout']} not applied: TRL's disable_dropout (default "
            "true) zeroes it; KTOConfig(lora_dropout=...) trains with dropout"
        )
    return out, notes
