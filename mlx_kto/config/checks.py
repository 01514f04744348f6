"""Value checks of a KTOConfig: ranges, choices and combinations.

Every check lives here, so a YAML file, a flag and a library caller get the same one-line
error (`--q-group-size (q_group_size): ...`). Types were checked before (config/types.py).
"""

from __future__ import annotations

import os

from mlx_kto.config.compat import validate_habits
from mlx_kto.config.types import bad

LOSS_TYPES = ("kto", "apo_zero_unpaired", "dpo", "ipo")
KL_ESTIMATES = ("step", "micro_batch")
SCHEDULES = ("cosine", "linear", "constant")
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize accepts (affine mode)
QUANT_GROUP_SIZES = (32, 64, 128)

# Smallest accepted value of each integer field (None = unset is always fine).
_INT_MINIMA = {
    "grad_accumulation_steps": 1,
    "epochs": 1,
    "iters": 1,
    "lora_rank": 1,
    "max_prompt_length": 1,
    "warmup_steps": 0,
    "steps_per_report": 1,
    "steps_per_eval": 0,
    "steps_per_save": 0,
    "keep_checkpoints": 0,
    "pad_multiple": 1,
    "pass_tokens": 0,
    "wired_limit_mb": 1,
    "cache_limit_mb": 0,
}
_INT_HINTS = {
    "steps_per_eval": " (0 = never)",
    "steps_per_save": " (0 = only at the end)",
    "keep_checkpoints": " (0 = keep all)",
    "pad_multiple": " (1 = no padding beyond the longest row)",
    "pass_tokens": " (0 = the whole micro-batch in one pass)",
}


def check_values(cfg) -> None:
    """Check the field values of `cfg` (a KTOConfig, types already checked); raise UserError
    naming the flag and the field."""
    if cfg.loss_type not in LOSS_TYPES:
        raise bad("loss_type", f"'{cfg.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
    if cfg.lr_schedule not in SCHEDULES:
        raise bad("lr_schedule", f"'{cfg.lr_schedule}' is not one of {', '.join(SCHEDULES)}")
    if cfg.batch_size < 1:
        raise bad("batch_size", "must be >= 1")
    if cfg.kl_estimate not in KL_ESTIMATES:
        raise bad("kl_estimate", f"'{cfg.kl_estimate}' is not one of {', '.join(KL_ESTIMATES)}")
    if cfg.loss_type == "kto" and cfg.batch_size < 2 and cfg.kl_estimate != "step":
        raise bad(
            "batch_size",
            "'kto' with kl_estimate 'micro_batch' needs a micro-batch of at least "
            "2 rows to estimate its KL reference point; use --kl-estimate step with "
            "--grad-accumulation-steps 2 or more, --batch-size 2 or more, or --loss-type "
            "apo_zero_unpaired, which has no KL term",
        )
    if "MLX_RANK" not in os.environ:  # one process; under mlx.launch train() checks ranks
        check_rows_per_step(cfg, world_size=1)
    if cfg.distributed_timeout < 0:
        raise bad("distributed_timeout", "must be >= 0 (0 = wait forever)")
    positive = ("beta", "undesirable_weight", "learning_rate", "lora_alpha", "lora_scale")
    if cfg.desirable_weight != "auto":
        positive += ("desirable_weight",)
    for name in positive:  # 0 would silently train nothing (alpha 0: LoRA scale 0)
        value = getattr(cfg, name)
        if value is not None and float(value) <= 0:
            raise bad(name, f"must be > 0 (got {value})")
    for name in ("max_grad_norm", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise bad(name, f"must be >= 0 (got {getattr(cfg, name)})")
    for name, lo in _INT_MINIMA.items():
        value = getattr(cfg, name)
        if value is not None and value < lo:
            raise bad(name, f"must be >= {lo} (got {value}){_INT_HINTS.get(name, '')}")
    for name in ("num_layers", "eval_batches"):  # -1 = all; 0 would also mean all
        value = getattr(cfg, name)
        if value == 0 or value < -1:
            raise bad(name, f"must be -1 (all) or >= 1 (got {value})")
    if not 0 <= cfg.seed < 2**32:
        raise bad("seed", f"must be in [0, 2**32) (got {cfg.seed})")
    if cfg.max_length < 2:
        raise bad("max_length", f"must be >= 2 (got {cfg.max_length})")
    if cfg.quantize is not None and cfg.quantize not in QUANT_BITS:
        raise bad(
            "quantize",
            f"{cfg.quantize} bits is not supported by MLX (use one of "
            f"{', '.join(map(str, QUANT_BITS))})",
        )
    if cfg.q_group_size not in QUANT_GROUP_SIZES:
        # MLX refuses other sizes; mlx-lm then skips every layer: an unquantized model
        raise bad(
            "q_group_size",
            f"{cfg.q_group_size} is not supported by MLX (use one of "
            f"{', '.join(map(str, QUANT_GROUP_SIZES))})",
        )
    if cfg.dtype not in (None, "float16", "bfloat16", "float32"):
        raise bad("dtype", f"'{cfg.dtype}' is not float16, bfloat16 or float32")
    if not 0 <= cfg.lora_dropout < 1:
        raise bad("lora_dropout", f"must be in [0, 1) (got {cfg.lora_dropout})")
    if cfg.lora_keys is not None:
        keys = [k.strip() for k in cfg.lora_keys]
        if not keys or any(not k for k in keys):
            raise bad("lora_keys", "needs module names, e.g. self_attn.q_proj,self_attn.v_proj")
        cfg.lora_keys = keys
    if cfg.max_bad_steps < 1:
        raise bad("max_bad_steps", f"must be >= 1 (got {cfg.max_bad_steps})")
    validate_habits(cfg)


def check_rows_per_step(cfg, world_size: int) -> None:
    """'kto' takes its reference point over an optimizer step's rows: it needs at least 2."""
    if cfg.loss_type == "kto" and cfg.rows_per_step(world_size) < 2:
        raise bad(
            "batch_size",
            f"'kto' needs at least 2 rows per optimizer step to estimate its KL "
            f"reference point (micro-batch {cfg.batch_size} x grad_accumulation_steps "
            f"{cfg.grad_accumulation_steps} x {world_size} rank(s)); raise "
            "--grad-accumulation-steps or --batch-size, or use --loss-type apo_zero_unpaired, "
            "which has no KL term",
        )
