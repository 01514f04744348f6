"""TRL's `KTOConfig` / transformers' `TrainingArguments` / TRL's script names (those that differ
from ours), as YAML keys and as `KTOConfig(...)` keyword arguments.

Each name is mapped to our field, refused by name with what to use instead, or accepted and
ignored, the last only where its value cannot change the trained adapter (logging, hub,
dataloader, device and memory switches, evaluation-only settings). README's "TRL names"
table lists them.
"""

from __future__ import annotations

from mlx_kto.config.translators import (
    Translator,
    boolean,
    ignore,
    ignore_if_unset,
    ignore_unless,
    optimizer,
    refuse,
    scheduler,
    shape,
    to,
)
from mlx_kto.errors import UserError


def _int_epochs(value, key, where):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value).is_integer():
            return int(value)
    raise UserError(
        f"{where}: '{key}: {value!r}' must be a whole number of epochs here (for a partial "
        "epoch set 'iters' to the number of optimizer steps)"
    )


def _max_steps(key, value, where):
    if value is None:
        return {}, None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return {}, f"'{key}: {value}' (unset) ignored"
    return {"iters": value}, f"'{key}' -> 'iters'"


def _save_total_limit(value, key, where):
    return 0 if value is None else value


def _unset_is_default(field: str) -> Translator:
    """A rename where None is TRL's "unset" (our default applies)."""

    def apply(key, value, where):
        if value is None:
            return {}, None
        return {field: value}, f"'{key}' -> '{field}'"

    return apply


def report_to(key, value, where):
    """TRL: a name, a list of names, 'all' or 'none'."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise UserError(f"{where}: '{key}' must list logger names (wandb, tensorboard)")
        value = ",".join(value) or "none"
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must name loggers (wandb, tensorboard or none)")
    if value.strip().lower() == "all":
        raise UserError(f"{where}: '{key}: all': name the loggers (wandb, tensorboard or none)")
    return {"report_to": value}, None


def warmup_steps(key, value, where):
    """transformers 5: a float below 1 is a share of the steps (its warmup_ratio)."""
    if isinstance(value, float) and 0 < value < 1:
        return {"warmup_ratio": value}, f"'{key}: {value}' (a share of the steps) -> 'warmup_ratio'"
    return {"warmup_steps": value}, None


def _dtype_flag(dtype: str) -> Translator:
    def apply(key, value, where):
        if value is None or not boolean(value, key, where):
            return {}, None
        return {"dtype": dtype}, f"'{key}' -> dtype {dtype} (the base weights are cast)"

    return apply


def _torch_dtype(key, value, where):
    if value in (None, "auto"):
        return {}, f"'{key}: {value}' -> keep the model's dtype"
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must name a dtype (e.g. bfloat16), got {shape(value)}")
    return {"dtype": value.removeprefix("torch.")}, f"'{key}' -> 'dtype'"


def _quant_flag(bits: int) -> Translator:
    def apply(key, value, where):
        on = value is not None and boolean(value, key, where)
        return ({"quantize": bits} if on else {}), f"'{key}' -> quantize {bits if on else 'off'}"

    return apply


def _strategy(field: str) -> Translator:
    def apply(key, value, where):
        if value == "no":
            return {field: 0}, f"'{key}: no' -> {field} 0"
        if value in ("steps", None):
            return {}, None
        raise UserError(f"{where}: '{key}: {value}' is not supported: set {field} (in steps)")

    return apply


def _pad_to_multiple_of(key, value, where):
    if value in (None, "auto"):
        return {}, None
    return {"pad_multiple": value}, f"'{key}' -> 'pad_multiple'"


def _is(value):
    return lambda v: v == value


MAPPED: dict[str, Translator] = {
    "per_device_train_batch_size": to("batch_size"),
    "gradient_accumulation_steps": to("grad_accumulation_steps"),
    "num_train_epochs": to("epochs", _int_epochs),
    "max_steps": _max_steps,
    "lr_scheduler_type": to("lr_schedule", scheduler),
    "save_steps": to("steps_per_save"),
    "save_total_limit": to("keep_checkpoints", _save_total_limit),
    "logging_steps": to("steps_per_report"),
    "eval_steps": _unset_is_default("steps_per_eval"),
    "eval_strategy": _strategy("steps_per_eval"),
    "evaluation_strategy": _strategy("steps_per_eval"),
    "save_strategy": _strategy("steps_per_save"),
    "output_dir": to("adapter_path"),
    "bf16": _dtype_flag("bfloat16"),
    "fp16": _dtype_flag("float16"),
    "torch_dtype": _torch_dtype,
    "gradient_checkpointing": to("grad_checkpoint"),
    "optim": optimizer,
    "disable_tqdm": _unset_is_default("quiet"),
    "model_name_or_path": to("model"),
    "dataset_name": to("data"),
    "dataset_train_split": to("data_split"),
    "lora_r": to("lora_rank"),
    "lora_target_modules": to("lora_keys"),
    "load_in_4bit": _quant_flag(4),
    "load_in_8bit": _quant_flag(8),
    "pad_to_multiple_of": _pad_to_multiple_of,
    "ddp_timeout": to("distributed_timeout"),
}

REFUSED: dict[str, Translator] = {
    "max_completion_length": refuse(
        "use max_length (completions are cut so prompt + completion <= max_length)"
    ),
    "train_sampling_strategy": ignore(
        "rows are shuffled every epoch (seeded by seed)",
        _is("random"),
        "rows are shuffled every epoch here (seeded by seed); TRL's sequential order is not "
        "offered (mlx-kto pairs each row with a fixed KL partner instead)",
    ),
    "truncation_mode": ignore(
        "max_prompt_length keeps the end of the prompt",
        _is("keep_end"),
        "only keep_end (max_prompt_length keeps the last prompt tokens)",
    ),
    "adam_beta1": ignore("AdamW's beta1 is 0.9", _is(0.9), "beta1 is fixed at 0.9"),
    "adam_beta2": ignore("AdamW's beta2 is 0.999", _is(0.999), "beta2 is fixed at 0.999"),
    "adam_epsilon": ignore("AdamW's eps is 1e-8", _is(1e-8), "eps is fixed at 1e-8"),
    "disable_dropout": ignore_unless(
        "the reference never uses dropout, and peft_config's lora_dropout is not applied",
        False,
        "LoRA dropout is KTOConfig's lora_dropout here (set it there)",
    ),
    "sync_ref_model": ignore_unless("", True, "the reference is the frozen base (or init_adapter)"),
    "use_peft": ignore_unless(
        "mlx-kto always trains an adapter", False, "full fine-tuning is not offered"
    ),
    "push_to_hub": ignore_unless("", True, "upload the adapter folder yourself (hf upload)"),
    "generate_during_eval": ignore_unless("", True, "sample with `mlx-kto generate`"),
    "is_encoder_decoder": ignore_unless("", True, "decoder-only models only (what mlx-lm loads)"),
    "use_liger_kernel": ignore_unless("", True, "MLX has its own fused kernels"),
    "load_best_model_at_end": ignore_unless("", True, "pick a checkpoint from ADAPTER_PATH"),
    "auto_find_batch_size": ignore_unless("", True, "set batch_size"),
    "model_init_kwargs": ignore_if_unset("use dtype, quantize, trust_remote_code"),
    "lr_scheduler_kwargs": ignore_if_unset("the schedule takes no arguments (lr_schedule)"),
    "optim_args": ignore_if_unset("AdamW takes weight_decay only"),
    "neftune_noise_alpha": ignore_if_unset("no embedding noise here"),
    "label_smoothing_factor": ignore_if_unset("KTO has no label smoothing here"),
    "router_aux_loss_coef": ignore_if_unset("the MoE load-balancing loss is not added here"),
    "data_seed": ignore_if_unset("the data order follows seed"),
    "deepspeed": ignore_if_unset("several ranks run under mlx.launch"),
    "fsdp": ignore_if_unset("several ranks run under mlx.launch"),
    "resume_from_checkpoint": ignore_if_unset("use resume (`mlx-kto train --resume RUN`)"),
    "activation_checkpointing": ignore_if_unset("use gradient_checkpointing"),
    "optim_target_modules": ignore_if_unset("AdamW updates the adapter only"),
}

# Accepted without effect: their values cannot change the trained adapter.
_NO_EFFECT = {
    "logging_strategy": "progress is reported every steps_per_report steps",
    "logging_dir": "tensorboard logs go to ADAPTER_PATH/runs",
    "logging_first_step": "the first step is always logged",
    "overwrite_output_dir": "the adapter folder is written in place",
    "do_train": "`train` trains",
    "do_eval": "evaluation runs when there is validation data",
    "do_predict": "no prediction pass",
    "remove_unused_columns": "unused columns are never read",
    "dataset_num_proc": "data is prepared in one process",
    "dataloader_num_workers": "data is prepared in one process",
    "label_pad_token_id": "labels are masks here, not padded ids",
    "padding_value": "the tokenizer's pad id is used",
    "precompute_ref_log_probs": "reference log-probs are always cached (`mlx-kto cache warm`)",
    "precompute_ref_batch_size": "reference log-probs are computed per batch_size",
    "per_device_eval_batch_size": "evaluation uses batch_size",
    "ref_model_mixup_alpha": "no reference syncing",
    "ref_model_sync_steps": "no reference syncing",
    "use_cpu": "MLX runs on its default device",
    "tf32": "a CUDA switch",
    "torch_compile": "the step is compiled with mx.compile (compile)",
    "torch_compile_backend": "a torch switch",
    "torch_compile_mode": "a torch switch",
    "torch_empty_cache_steps": "a torch switch (cache_limit_mb caps MLX's cache)",
    "gradient_checkpointing_kwargs": "a torch switch",
    "activation_offloading": "a memory switch",
    "average_tokens_across_devices": "KTO's loss is per sequence",
    "full_determinism": "runs are seeded (seed)",
    "log_level": "a logging switch",
    "log_level_replica": "a logging switch",
    "log_on_each_node": "rank 0 logs",
    "logging_nan_inf_filter": "non-finite steps are skipped and counted",
    "include_num_input_tokens_seen": "metrics.jsonl counts trained tokens",
    "include_tokens_per_second": "progress shows tokens/s",
    "save_only_model": "checkpoints hold what resume needs",
    "save_safetensors": "adapters are safetensors",
    "save_on_each_node": "rank 0 saves",
    "skip_memory_metrics": "a logging switch",
    "eval_accumulation_steps": "evaluation-only",
    "eval_delay": "evaluation-only",
    "eval_on_start": "evaluation-only",
    "eval_do_concat_batches": "evaluation-only",
    "eval_use_gather_object": "evaluation-only",
    "batch_eval_metrics": "evaluation-only",
    "include_for_metrics": "evaluation-only",
    "prediction_loss_only": "evaluation-only",
    "bf16_full_eval": "evaluation-only",
    "fp16_full_eval": "evaluation-only",
    "metric_for_best_model": "no best-model selection",
    "greater_is_better": "no best-model selection",
    "label_names": "labels come from the label column",
    "length_column_name": "lengths are measured",
    "ignore_data_skip": "resume restores the data position",
    "restore_callback_states_from_checkpoint": "callbacks keep no state here",
    "use_mps_device": "MLX runs on its default device",
    "use_cache": "training runs without a KV cache",
    "enable_jit_checkpoint": "checkpoints are written every steps_per_save",
    "local_rank": "ranks come from mlx.launch",
    "project": "wandb's project is project_name",
    "debug": "a torch switch",
    "group_by_length": "micro-batches are length-bucketed in shuffled windows either way",
}
_NO_EFFECT |= {f"dataloader_{k}": "a torch dataloader switch" for k in (
    "drop_last", "pin_memory", "persistent_workers", "prefetch_factor",
    "multiprocessing_context", "in_order",
)}  # fmt: skip
_NO_EFFECT |= {f"ddp_{k}": "a torch DDP switch" for k in (
    "find_unused_parameters", "bucket_cap_mb", "broadcast_buffers", "static_graph", "backend",
)}  # fmt: skip
_NO_EFFECT |= {f"hub_{k}": "only with push_to_hub" for k in (
    "token", "private_repo", "model_id", "strategy", "always_push", "revision",
)}  # fmt: skip
_NO_EFFECT |= {f"trackio_{k}": "trackio is not a logger here" for k in (
    "space_id", "bucket_id", "static_space_id",
)}  # fmt: skip
IGNORED: dict[str, Translator] = {k: ignore(why) for k, why in _NO_EFFECT.items()}
IGNORED |= {k: ignore_if_unset("a torch setup") for k in (
    "accelerator_config", "parallelism_config", "fsdp_config", "liger_kernel_config",
)}  # fmt: skip

TRL: dict[str, Translator] = {**MAPPED, **REFUSED, **IGNORED}

# TRL's attribute names, read (and written) on a KTOConfig as our fields: `args.output_dir`.
READS = {
    "output_dir": "adapter_path",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accumulation_steps",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_schedule",
    "logging_steps": "steps_per_report",
    "save_steps": "steps_per_save",
    "eval_steps": "steps_per_eval",
    "save_total_limit": "keep_checkpoints",
    "gradient_checkpointing": "grad_checkpoint",
    "disable_tqdm": "quiet",
    "max_steps": "iters",  # None here is -1 there
}
