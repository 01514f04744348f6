"""YAML keys users bring from mlx-lm (`mlx_lm.lora -c`) and TRL (`KTOConfig`, TRL's
script arguments): each one is mapped to our field with a note, or refused by name
with the field to use. Paths in a YAML file resolve relative to that file.

`translate(raw, path, names, log)` turns the raw YAML mapping into {our_field: value};
`config.load_yaml` then coerces the values to the field types.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

# Inputs: resolved against the YAML's folder when they exist there (a hub id stays as is).
INPUT_PATHS = ("model", "data", "init_adapter", "resume", "chat_template")
# Outputs: always relative to the YAML's folder.
OUTPUT_PATHS = ("adapter_path", "ref_cache")

# A translator gets (key, value, where) and returns ({field: value}, note or None).
Translator = Callable[[str, Any, str], tuple[dict, str | None]]


def _to(field: str, fn: Callable[[Any, str, str], Any] | None = None, why: str = "") -> Translator:
    def apply(key, value, where):
        v = fn(value, key, where) if fn else value
        return {field: v}, f"'{key}' -> '{field}'{why}"

    return apply


def _refuse(hint: str) -> Translator:
    def apply(key, value, where):
        if value is None:  # written out but unset
            return {}, None
        raise UserError(f"{where}: '{key}' is not supported: {hint}")

    return apply


def _ignore(why: str, ok: Callable[[Any], bool] = lambda v: True, hint: str = "") -> Translator:
    """Accept the key without effect (with a note) when `ok(value)`, else refuse with `hint`."""

    def apply(key, value, where):
        if not ok(value):
            raise UserError(f"{where}: '{key}: {value!r}' is not supported: {hint}")
        return {}, f"'{key}' ignored: {why}"

    return apply


def _int_epochs(value, key, where):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if float(value).is_integer():
            return int(value)
    raise UserError(
        f"{where}: '{key}: {value!r}' must be a whole number of epochs here (for a partial "
        "epoch set 'iters' to the number of optimizer steps)"
    )


def _max_steps(key, value, where):
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        return {}, f"'{key}: {value}' (unset) ignored"
    return {"iters": value}, f"'{key}' -> 'iters'"


def _save_total_limit(value, key, where):
    return 0 if value is None else value


def _report_to(value, key, where):
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value) or "none"
    if str(value).strip().lower() == "all":
        raise UserError(f"{where}: '{key}: all': name the loggers (wandb, tensorboard or none)")
    return value


_SCHEDULERS = {
    "cosine": "cosine",
    "cosine_decay": "cosine",
    "linear": "linear",
    "linear_schedule": "linear",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


def _scheduler(value, key, where):
    name = str(value)
    if name not in _SCHEDULERS:
        raise UserError(
            f"{where}: '{key}: {value}' is not supported (lr_schedule is one of cosine, linear, "
            "constant; each after a linear warmup)"
        )
    return _SCHEDULERS[name]


def _lr_schedule(key, value, where):
    """Ours is a name; mlx-lm's is {name, warmup, warmup_init, arguments}."""
    if not isinstance(value, dict):
        return {"lr_schedule": value}, None
    out = {"lr_schedule": _scheduler(value.get("name"), f"{key}.name", where)}
    if "warmup" in value:
        out["warmup_steps"] = value["warmup"]
    args = value.get("arguments") or []
    if value.get("warmup_init", 0.0) not in (0, 0.0) or (len(args) > 2 and args[2] not in (0, 0.0)):
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
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be a mapping of rank, scale, dropout, keys")
    out = {}
    for sub, v in value.items():
        if sub not in _LORA_SUB:
            raise UserError(f"{where}: unknown key '{key}.{sub}'{_suggest(sub, list(_LORA_SUB))}")
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
    return {"fine_tune_type": "dora" if value else "lora"}, f"'{key}' -> 'fine_tune_type'"


def _optimizer(key, value, where):
    if str(value).lower() in ("adam", "adamw", "adamw_torch", "adamw_torch_fused", "adamw_hf"):
        return {}, f"'{key}: {value}': the optimizer is AdamW (Adam when weight_decay is 0)"
    raise UserError(f"{where}: '{key}: {value}' is not supported: the optimizer is AdamW")


def _optimizer_config(key, value, where):
    """mlx-lm: {adamw: {weight_decay, betas, eps}}; only weight_decay is configurable."""
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{key}' must be a mapping")
    out = {}
    for opt_name, params in value.items():
        for p, v in (params or {}).items():
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
    if not isinstance(value, dict) or not (value.get("path") or value.get("name")):
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


def _dtype_flag(dtype: str) -> Translator:
    def apply(key, value, where):
        if not value:
            return {}, f"'{key}: false' ignored"
        return {"dtype": dtype}, f"'{key}' -> dtype {dtype} (the base weights are cast)"

    return apply


def _torch_dtype(key, value, where):
    if value in (None, "auto"):
        return {}, f"'{key}: {value}' -> keep the model's dtype"
    return {"dtype": value}, f"'{key}' -> 'dtype'"


def _quant_flag(bits: int) -> Translator:
    def apply(key, value, where):
        return (
            {"quantize": bits} if value else {}
        ), f"'{key}' -> quantize {bits if value else 'off'}"

    return apply


def _strategy(field: str) -> Translator:
    def apply(key, value, where):
        if value == "no":
            return {field: 0}, f"'{key}: no' -> {field} 0"
        if value == "steps":
            return {}, None
        raise UserError(f"{where}: '{key}: {value}' is not supported: set {field} (in steps)")

    return apply


# mlx-lm's `mlx_lm.lora` config names (those that differ from ours).
MLX_LM: dict[str, Translator] = {
    "lora_parameters": _lora_parameters,
    "max_seq_length": _to("max_length"),
    "val_batches": _to("eval_batches"),
    "save_every": _to("steps_per_save"),
    "lora_layers": _to("num_layers"),
    "fine_tune_type": _fine_tune_type,
    "use_dora": _use_dora,
    "optimizer": _optimizer,
    "optimizer_config": _optimizer_config,
    "hf_dataset": _hf_dataset,
    "wandb": _wandb,
    "train": _ignore(
        "training is what `train` does", bool, "to score an adapter use `mlx-kto eval`"
    ),
    "test": _ignore(
        "no test pass after training",
        lambda v: not v,
        "score the test split with `mlx-kto eval --split test`",
    ),
    "test_batches": _ignore("no test pass after training (`mlx-kto eval --split test`)"),
    "mask_prompt": _ignore(
        "KTO always scores the completion only", bool, "KTO scores the completion only"
    ),
    "resume_adapter_file": _refuse(
        "use 'init_adapter: FOLDER' to start from an adapter (it becomes the frozen reference), "
        "or 'resume: RUN_FOLDER' to continue an interrupted mlx-kto run"
    ),
}

# TRL's KTOConfig / TrainingArguments / script arguments (those that differ from ours).
TRL: dict[str, Translator] = {
    "per_device_train_batch_size": _to("batch_size"),
    "gradient_accumulation_steps": _to("grad_accumulation_steps"),
    "num_train_epochs": _to("epochs", _int_epochs),
    "max_steps": _max_steps,
    "lr_scheduler_type": _to("lr_schedule", _scheduler),
    "save_steps": _to("steps_per_save"),
    "save_total_limit": _to("keep_checkpoints", _save_total_limit),
    "logging_steps": _to("steps_per_report"),
    "eval_steps": _to("steps_per_eval"),
    "eval_strategy": _strategy("steps_per_eval"),
    "evaluation_strategy": _strategy("steps_per_eval"),
    "save_strategy": _strategy("steps_per_save"),
    "logging_strategy": _ignore("progress is reported every steps_per_report steps"),
    "output_dir": _to("adapter_path"),
    "bf16": _dtype_flag("bfloat16"),
    "fp16": _dtype_flag("float16"),
    "torch_dtype": _torch_dtype,
    "gradient_checkpointing": _to("grad_checkpoint"),
    "optim": _optimizer,
    "disable_tqdm": _to("quiet"),
    "model_name_or_path": _to("model"),
    "dataset_name": _to("data"),
    "dataset_train_split": _to("data_split"),
    "lora_r": _to("lora_rank"),
    "lora_target_modules": _to("lora_keys"),
    "use_peft": _ignore(
        "mlx-kto always trains an adapter", bool, "full fine-tuning is not offered"
    ),
    "load_in_4bit": _quant_flag(4),
    "load_in_8bit": _quant_flag(8),
    "max_completion_length": _refuse(
        "use max_length (completions are cut so prompt + completion <= max_length)"
    ),
    "truncation_mode": _ignore(
        "max_prompt_length keeps the end of the prompt",
        lambda v: v == "keep_end",
        "only keep_end (max_prompt_length keeps the last prompt tokens)",
    ),
    "precompute_ref_log_probs": _ignore(
        "reference log-probs are always cached (`mlx-kto cache warm` precomputes them)"
    ),
    "per_device_eval_batch_size": _ignore("evaluation uses batch_size"),
    "adam_beta1": _ignore("AdamW's beta1 is 0.9", lambda v: v == 0.9, "beta1 is fixed at 0.9"),
    "adam_beta2": _ignore(
        "AdamW's beta2 is 0.999", lambda v: v == 0.999, "beta2 is fixed at 0.999"
    ),
    "adam_epsilon": _ignore("AdamW's eps is 1e-8", lambda v: v == 1e-8, "eps is fixed at 1e-8"),
    "disable_dropout": _ignore(
        "the reference always runs without dropout (lora_dropout is 0 by default)"
    ),
    "push_to_hub": _ignore("", lambda v: not v, "upload the adapter folder yourself (hf upload)"),
    "generate_during_eval": _ignore("", lambda v: not v, "sample with `mlx-kto generate`"),
    "logging_dir": _ignore("tensorboard logs go to ADAPTER_PATH/runs"),
    "logging_first_step": _ignore("the first step is always logged"),
    "overwrite_output_dir": _ignore("the adapter folder is written in place"),
    "do_train": _ignore("`train` trains"),
    "do_eval": _ignore("evaluation runs when the data has a valid split"),
    "remove_unused_columns": _ignore("unused columns are never read"),
    "dataset_num_proc": _ignore("data is prepared in one process"),
    "dataloader_num_workers": _ignore("data is prepared in one process"),
    "label_pad_token_id": _ignore("labels are masks here, not padded ids"),
    "padding_value": _ignore("the tokenizer's pad id is used"),
    "is_encoder_decoder": _ignore(
        "", lambda v: not v, "decoder-only models only (what mlx-lm loads)"
    ),
    "use_liger_kernel": _ignore("", lambda v: not v, "MLX has its own fused kernels"),
    "model_init_kwargs": _ignore("", lambda v: not v, "use dtype, quantize, trust_remote_code"),
}

# Our own names whose value can also come in the other tools' form.
OWN_FORMS: dict[str, Translator] = {
    "lr_schedule": _lr_schedule,
    "report_to": lambda k, v, w: ({"report_to": _report_to(v, k, w)}, None),  # TRL: a list
}

ALIASES: dict[str, Translator] = {**MLX_LM, **TRL}


def _suggest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def resolve_paths(values: dict, base: Path, log: Callable[[str], None], where: str) -> dict:
    """Make relative paths in `values` relative to `base` (the YAML's folder)."""
    for name in INPUT_PATHS + OUTPUT_PATHS:
        v = values.get(name)
        if not isinstance(v, str) or not v or os.path.isabs(os.path.expanduser(v)):
            continue
        if "\n" in v or "{" in v:  # an inline chat template, not a path
            continue
        here = os.path.abspath(base / v)
        if name in OUTPUT_PATHS or os.path.exists(here):
            values[name] = here
        elif os.path.exists(v):
            log(
                f"note: {where}: {name} '{v}' is not next to the YAML file; using ./{v} "
                "(paths in a YAML file are relative to the file)"
            )
    return values


def translate(
    raw: dict, path: Path, names: set[str], log: Callable[[str], None] | None = None
) -> dict:
    """The raw YAML mapping -> {our_field: value} (see module docstring). Notes go to `log`."""
    log = log or (lambda m: None)
    where = str(path)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}  # field -> the YAML key that set it
    notes = []
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in OWN_FORMS:
            mapped, note = OWN_FORMS[name](str(key), value, where)
        elif name in names:
            mapped, note = {name: value}, None
        elif name in ALIASES:
            mapped, note = ALIASES[name](str(key), value, where)
        else:
            hint = _suggest(name, sorted(names | set(ALIASES)))
            raise UserError(f"{where}: unknown field '{key}'{hint} (see `mlx-kto train --help`)")
        for field, v in mapped.items():
            if field in out and out[field] != v:
                raise UserError(
                    f"{where}: '{key}' and '{origin[field]}' both set {field} "
                    f"({v!r} vs {out[field]!r}); keep one"
                )
            out[field], origin[field] = v, str(key)
        if note:
            notes.append(note)
    if out.get("warmup_steps") == 0 and "warmup_ratio" in out:
        # TRL: warmup_steps (default 0) only overrides warmup_ratio when > 0.
        del out["warmup_steps"]
        notes.append("'warmup_steps: 0' with warmup_ratio: the ratio applies (as in TRL)")
    mapped = [n for n in notes if n.startswith("'") and "' -> '" in n and ";" not in n]
    if mapped:  # plain renames on one line, everything else (ignored, refused parts) apart
        log(f"note: {where}: names mapped: " + ", ".join(n.replace("'", "") for n in mapped))
    for note in notes:
        if note not in mapped:
            log(f"note: {where}: {note}")
    return resolve_paths(out, path.parent, log, where)


REPORTERS = ("wandb", "tensorboard", "none")


def report_targets(report_to: str | None) -> list[str]:
    """'wandb,tensorboard' -> ['wandb', 'tensorboard']; 'none' / '' -> []."""
    names = [n.strip().lower() for n in str(report_to or "none").split(",") if n.strip()]
    return [n for n in names if n != "none"]


def validate_habits(cfg) -> None:
    """Checks of the fields added for mlx-lm / TRL habits; UserError names the field."""
    if cfg.fine_tune_type not in ("lora", "dora"):
        raise UserError(f"fine_tune_type: '{cfg.fine_tune_type}' is not lora or dora")
    if not 0 <= cfg.warmup_ratio < 1:
        raise UserError("warmup_ratio: must be in [0, 1)")
    for name in str(cfg.report_to or "none").split(","):
        if name.strip().lower() not in REPORTERS:
            raise UserError(
                f"report_to: '{name.strip()}' is not one of {', '.join(REPORTERS)}"
                f"{_suggest(name.strip().lower(), REPORTERS)}"
            )
