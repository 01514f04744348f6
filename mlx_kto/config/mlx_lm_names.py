"""mlx-lm's `mlx_lm.lora -c` config names (those that differ from ours), mapped or refused."""

from __future__ import annotations

from mlx_kto.config.translators import (
    Translator,
    boolean,
    ignore,
    ignore_bool,
    ignore_unless,
    mapping,
    optimizer,
    refuse,
    scheduler,
    shape,
    suggest,
    to,
)
from mlx_kto.errors import UserError


def lr_schedule(key, value, where):
    """Ours is a name; mlx-lm's is {name, warmup, warmup_init, arguments}."""
    if not isinstance(value, dict):
        return {"lr_schedule": value}, None
    out = {"lr_schedule": scheduler(value.get("name"), f"{key}.name", where)}
    if "warmup" in value:
        out["warmup_steps"] = value["warmup"]
    args = value.get("arguments") or []
    if not isinstance(args, list):
        raise UserError(
            f"{where}: '{key}.arguments' must be a list (peak, steps, end), got {shape(args)}"
        )
    init = value.get("warmup_init", 0.0)
    if isinstance(init, bool) or not isinstance(init, (int, float)):
        raise UserError(f"{where}: '{key}.warmup_init' must be a number, got {shape(init)}")
    if init != 0 or (len(args) > 2 and args[2] not in (0, 0.0)):
        raise UserError(
            f"{where}: '{key}': warmup starts at 0 and decay ends at 0 here; "
            "warmup_init and a non-zero end value are not supported"
        )
    note = f"'{key}' (mlx-lm) -> lr_schedule {out['lr_schedule']}" + (
        f", warmup_steps {out['warmup_steps']}" if "warmup_steps" in out else ""
    )
    if args:
        note += "; 'arguments' ignored: the peak is learning_rate and the decay spans the run"
    return out, note


_LORA_SUB = {"rank": "lora_rank", "scale": "lora_scale", "alpha": "lora_alpha"}
_LORA_SUB |= {"dropout": "lora_dropout", "keys": "lora_keys"}


def _lora_parameters(key, value, where):
    out = {}
    for sub, v in mapping(value, key, where, " of rank, scale, dropout, keys").items():
        if sub not in _LORA_SUB:
            raise UserError(f"{where}: unknown key '{key}.{sub}'{suggest(sub, list(_LORA_SUB))}")
        out[_LORA_SUB[sub]] = v
    names = ", ".join(f"{k} -> {_LORA_SUB[k]}" for k in value)
    return out, f"'{key}' (mlx-lm): {names}"


def _fine_tune_type(key, value, where):
    if value in ("lora", "dora"):
        return {"fine_tune_type": value}, None
    raise UserError(
        f"{where}: '{key}: {value}' is not supported (fine_tune_type is lora or dora; "
        "KTO's reference is the base, recovered by switching the adapter off)"
    )


def _use_dora(key, value, where):
    dora = boolean(value, key, where)
    return {"fine_tune_type": "dora" if dora else "lora"}, f"'{key}' -> 'fine_tune_type'"


def _optimizer_config(key, value, where):
    """mlx-lm: {adamw: {weight_decay, betas, eps}}; only weight_decay is configurable."""
    out = {}
    for opt_name, params in mapping(value, key, where, " of optimizer: settings").items():
        params = mapping(params or {}, f"{key}.{opt_name}", where, " of setting: value")
        for p, v in params.items():
            if p == "weight_decay":
                out["weight_decay"] = v
            elif (p, v) in (("betas", [0.9, 0.999]), ("eps", 1e-8)):
                continue  # our AdamW's values
            else:
                raise UserError(
                    f"{where}: '{key}.{opt_name}.{p}' is not supported (only weight_decay is)"
                )
    return out, f"'{key}' -> {', '.join(out) or 'nothing (defaults)'}"


def _hf_dataset(key, value, where):
    value = mapping(value, key, where, " with 'path' (a dataset id)")
    if not (value.get("path") or value.get("name")):
        raise UserError(f"{where}: '{key}' must be a mapping with 'path' (a dataset id)")
    out = {"data": value.get("path") or value.get("name")}
    for sub in value:
        if sub == "train_split":
            out["data_split"] = value[sub]
        elif sub not in ("path", "name", "valid_split", "test_split"):
            raise UserError(
                f"{where}: '{key}.{sub}' is not supported (column names: prompt_field, "
                "completion_field, label_field, messages_field)"
            )
    return out, f"'{key}' (mlx-lm) -> data {out['data']}"


def _wandb(key, value, where):
    if not value:
        return {}, None
    return {"report_to": "wandb", "project_name": value}, f"'{key}' -> report_to wandb"


MLX_LM: dict[str, Translator] = {
    "lora_parameters": _lora_parameters,
    "max_seq_length": to("max_length"),
    "val_batches": to("eval_batches"),
    "save_every": to("steps_per_save"),
    "lora_layers": to("num_layers"),
    "fine_tune_type": _fine_tune_type,
    "use_dora": _use_dora,
    "optimizer": optimizer,
    "optimizer_config": _optimizer_config,
    "hf_dataset": _hf_dataset,
    "wandb": _wandb,
    "train": ignore_unless(
        "training is what `train` does", False, "to score an adapter use `mlx-kto eval`"
    ),
    "test": ignore_unless(
        "no test pass after training", True, "score the test split with `mlx-kto eval --split test`"
    ),
    "test_batches": ignore("no test pass after training (`mlx-kto eval --split test`)"),
    "mask_prompt": ignore_bool("KTO always scores the completion only"),
    "resume_adapter_file": refuse(
        "use 'init_adapter: FOLDER' to start from an adapter (it becomes the frozen reference), "
        "or 'resume: RUN_FOLDER' to continue an interrupted mlx-kto run"
    ),
}
