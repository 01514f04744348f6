"""KTOConfig: every training setting in one dataclass, loadable from YAML.

Defaults follow the paper and TRL (beta 0.1, weights 1, max_length 1024) with a
learning rate suited to LoRA. The CLI builds one flag per field from the `help`
metadata, so `mlx-kto train --help` documents everything here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

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
    "wired_limit_mb": 1,
    "cache_limit_mb": 0,
}
_INT_HINTS = {
    "steps_per_eval": " (0 = never)",
    "steps_per_save": " (0 = only at the end)",
    "keep_checkpoints": " (0 = keep all)",
    "pad_multiple": " (1 = no padding beyond the longest row)",
}
_FLOAT_FIELDS = (
    "beta",
    "desirable_weight",
    "undesirable_weight",
    "learning_rate",
    "weight_decay",
    "max_grad_norm",
    "lora_alpha",
    "lora_scale",
    "lora_dropout",
    "distributed_timeout",
)
# Field -> flag where the flag is not `--` + the field name with dashes (cli.py builds one
# flag per field that way, so none differ today; add any that ever do).
FLAGS: dict[str, str] = {}


def flag(name: str) -> str:
    """The flag a user types for config field `name` (`q_group_size` -> `--q-group-size`)."""
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _bad(name: str, msg: str) -> UserError:
    """A UserError naming the flag and, for YAML users, the field: `--seed (seed): ...`."""
    return UserError(f"{flag(name)} ({name}): {msg}")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class KTOConfig:
    # what to train
    model: str | None = _f(
        None, "Base model: local folder, .gguf file or Hugging Face hub id (what mlx-lm loads)."
    )
    data: str | None = _f(
        None,
        "Feedback data: a .jsonl/.json file, or a folder with train.jsonl (+ valid.jsonl, test.jsonl).",
    )
    adapter_path: str = _f(
        "adapters", "Output folder: adapters, checkpoints, metrics.jsonl, config."
    )
    init_adapter: str | None = _f(
        None,
        "Start from this mlx-lm adapter folder; the reference is then that adapter, frozen.",
    )
    resume: str | None = _f(
        None, "Resume from a checkpoint folder (or a run folder: its latest checkpoint)."
    )
    resume_changed: bool = _f(
        False,
        "With --resume: continue even though the training data or the setup (batch size, "
        "seed, learning rate, ...) differ from the checkpoint's.",
    )
    overwrite: bool = _f(
        False,
        "Start afresh in an adapter_path that holds a previous run (its adapter, metrics "
        "and checkpoints are deleted first).",
    )
    # KTO objective
    loss_type: str = _f(
        "kto",
        "Loss: 'kto', 'apo_zero_unpaired' (no KL term; allows micro-batch 1), or the paired "
        "baselines 'dpo' / 'ipo' (prompt/chosen/rejected data; --batch-size counts pairs).",
        choices=LOSS_TYPES,
    )
    beta: float = _f(0.1, "KTO beta: scale of the implied reward (paper: 0.1 close to best).")
    desirable_weight: Any = _f(
        1.0, "lambda_D, weight of desirable rows; 'auto' picks it from the class balance."
    )
    undesirable_weight: float = _f(1.0, "lambda_U, weight of undesirable rows.")
    # column mapping (mlx_kto.data.columns)
    label_field: str | None = _f(None, "Read the label from this field (dotted path ok).")
    prompt_field: str | None = _f(None, "Read the prompt from this field.")
    completion_field: str | None = _f(None, "Read the completion from this field.")
    messages_field: str | None = _f(None, "Read the chat messages from this field.")
    label_threshold: float | None = _f(
        None, "Numeric ratings: >= this is desirable, below undesirable (e.g. 4 for 1-5 stars)."
    )
    # data shaping
    max_length: int = _f(1024, "Max tokens of prompt+completion; longer completions are cut.")
    max_prompt_length: int | None = _f(
        None, "If set, keep only the last N prompt tokens (legacy TRL keep_end)."
    )
    batch_size: int = _f(
        4,
        "Micro-batch size (rows per forward). 'kto' with 1 needs grad_accumulation_steps >= 2 "
        "(or several ranks) and kl_estimate 'step'.",
    )
    grad_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    kl_estimate: str = _f(
        "step",
        "KTO reference point z over the whole optimizer step ('step': every micro-batch and "
        "rank, the update equals one batch of micro-batch x accumulation x ranks rows) or over "
        "each micro-batch on its own ('micro_batch', as TRL does with accumulation).",
        choices=KL_ESTIMATES,
    )
    distributed_timeout: float = _f(
        600.0,
        "Several ranks (mlx.launch): end the run with a message when a collective waits longer "
        "than this many seconds for the other ranks (0 = wait forever).",
    )
    # schedule
    epochs: int = _f(1, "Passes over the training data (ignored when iters is set).")
    iters: int | None = _f(None, "Optimizer steps to run (overrides epochs).")
    learning_rate: float = _f(5e-5, "Peak learning rate (LoRA; full fine-tuning would use ~5e-6).")
    lr_schedule: str = _f(
        "cosine", "Decay after warmup: cosine, linear or constant.", choices=SCHEDULES
    )
    warmup_steps: int | None = _f(None, "Linear warmup steps, >= 0 (default: 10% of the steps).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_bias_correction: bool = _f(
        False,
        "AdamW bias correction, as torch and TRL apply it. Off is MLX's and mlx-lm's default, "
        "whose first updates are then 3-6x larger at the same learning rate: turn it on to "
        "reuse a learning rate tuned with TRL.",
    )
    max_grad_norm: float = _f(1.0, "Clip the gradient to this global norm (0 disables).")
    seed: int = _f(0, "Seed (0 to 2**32-1) for data order, KL partners, LoRA init and dropout.")
    # LoRA
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float | None = _f(16.0, "LoRA alpha; scale = alpha / rank (PEFT convention).")
    lora_scale: float | None = _f(None, "LoRA scale (mlx-lm convention); overrides lora_alpha.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    num_layers: int = _f(-1, "Apply LoRA to the last N transformer blocks (-1 = all).")
    lora_keys: list[str] | None = _f(
        None,
        "Modules inside a block to adapt, e.g. self_attn.q_proj (default: every linear layer).",
    )
    # model handling
    quantize: int | None = _f(
        None,
        "Quantize the base to 2, 3, 4, 5, 6 or 8 bits at load (QLoRA; 4 is usual).",
        choices=(None, 2, 3, 4, 5, 6, 8),
    )
    q_group_size: int = _f(64, "Quantization group size: 32, 64 or 128.")
    dtype: str | None = _f(
        None,
        "Cast base weights: float16, bfloat16 or float32 (default: keep).",
        choices=(None, "float16", "bfloat16", "float32"),
    )
    grad_checkpoint: bool = _f(
        False, "Recompute block activations in the backward pass (less memory)."
    )
    compile: bool = _f(True, "Compile the training step with mx.compile.")
    trust_remote_code: bool = _f(False, "Allow models whose config asks to run custom code.")
    # reference cache
    ref_cache: str | None = _f(
        None, "Reference log-prob cache folder (default: ~/.cache/mlx_kto/reference)."
    )
    no_ref_cache: bool = _f(False, "Do not cache reference log-probs on disk.")
    # reporting
    steps_per_report: int = _f(10, "Print a progress line every N steps.")
    steps_per_eval: int = _f(50, "Evaluate on the validation split every N steps (0 = never).")
    eval_batches: int = _f(-1, "Validation micro-batches per evaluation (-1 = all).")
    # diversity probes (mlx_kto/judge/probes.py)
    diversity_every: int = _f(
        0,
        "Every N steps (and at checkpoints) sample probe prompts and log distinct-1/2, "
        "self-BLEU and entropy (0 = off).",
    )
    diversity_prompts: int = _f(8, "Probe prompts (the first distinct ones of the valid split).")
    diversity_samples: int = _f(4, "Samples per probe prompt (>= 2, self-BLEU compares them).")
    diversity_max_tokens: int = _f(48, "Max new tokens per probe sample.")
    collapse_threshold: float = _f(
        0.5, "Warn of mode collapse when diversity falls below this share of the base's."
    )
    steps_per_save: int = _f(
        100, "Write a resumable checkpoint every N steps (0 = only at the end)."
    )
    keep_checkpoints: int = _f(2, "Keep only the newest N checkpoints (0 = keep all).")
    max_bad_steps: int = _f(
        3,
        "Stop after N optimizer steps in a row whose loss or gradient is not finite (NaN/inf); "
        "such steps are skipped, never applied to the weights.",
    )
    pad_multiple: int = _f(16, "Pad batch lengths to a multiple of this (fewer compiled shapes).")
    packing: bool = _f(
        True,
        "Pack each micro-batch's sequences (and their KL and reference sequences) end to end, "
        "attention kept inside each sequence: no padding is computed, the numbers are the "
        "padded ones (--no-packing pads every sequence to the longest).",
    )
    wired_limit_mb: int | None = _f(
        None, "Metal wired memory limit in MB (default: mlx-lm's recommended limit)."
    )
    cache_limit_mb: int | None = _f(
        None, "Cap MLX's buffer cache in MB to keep a small Mac responsive."
    )
    quiet: bool = _f(False, "Less output: no progress bar.")
    # habits from TRL / mlx-lm (issue 14)
    data_split: str | None = _f(
        None, "Split to train on when data is a Hugging Face dataset id (default: train)."
    )
    chat_template: str | None = _f(
        None, "Chat template to use instead of the tokenizer's: a Jinja file or the template text."
    )
    fine_tune_type: str = _f("lora", "Adapter type: lora or dora (mlx-lm's DoRALinear).")
    warmup_ratio: float = _f(0.1, "Warmup as a fraction of the steps when warmup_steps is unset.")
    report_to: str = _f(
        "none", "Also log metrics to: wandb, tensorboard (comma-separated) or none."
    )
    project_name: str | None = _f(None, "wandb project (default: mlx-kto).")
    run_name: str | None = _f(
        None, "Run name for wandb / tensorboard (default: the adapter folder)."
    )

    def validate(self) -> KTOConfig:
        """Check field values; raise UserError naming the flag and the field.

        Every check lives here, so a YAML file, a flag and a library caller get the
        same one-line error (`--q-group-size (q_group_size): ...`)."""
        if self.loss_type not in LOSS_TYPES:
            raise _bad("loss_type", f"'{self.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        if self.lr_schedule not in SCHEDULES:
            raise _bad("lr_schedule", f"'{self.lr_schedule}' is not one of {', '.join(SCHEDULES)}")
        if self.batch_size < 1:
            raise _bad("batch_size", "must be >= 1")
        if self.kl_estimate not in KL_ESTIMATES:
            raise _bad(
                "kl_estimate", f"'{self.kl_estimate}' is not one of {', '.join(KL_ESTIMATES)}"
            )
        if self.loss_type == "kto" and self.batch_size < 2 and self.kl_estimate != "step":
            raise _bad(
                "batch_size",
                "'kto' with kl_estimate 'micro_batch' needs a micro-batch of at least "
                "2 rows to estimate its KL reference point; use --kl-estimate step with "
                "--grad-accumulation-steps 2 or more, --batch-size 2 or more, or --loss-type "
                "apo_zero_unpaired, which has no KL term",
            )
        if "MLX_RANK" not in os.environ:  # one process; under mlx.launch train() checks ranks
            check_rows_per_step(self, world_size=1)
        if self.distributed_timeout < 0:
            raise _bad("distributed_timeout", "must be >= 0 (0 = wait forever)")
        if isinstance(self.desirable_weight, str):
            if self.desirable_weight.strip().lower() != "auto":
                try:
                    self.desirable_weight = float(self.desirable_weight)
                except ValueError:
                    raise _bad(
                        "desirable_weight", f"'{self.desirable_weight}' is not a number or 'auto'"
                    ) from None
            else:
                self.desirable_weight = "auto"
        for name in _FLOAT_FIELDS:  # NaN passes every `<= 0` test below: refuse it first
            value = getattr(self, name)
            if value is not None and value != "auto" and not math.isfinite(float(value)):
                raise _bad(name, f"{value} is not a finite number")
        positive = ("beta", "undesirable_weight", "learning_rate", "lora_alpha", "lora_scale")
        if self.desirable_weight != "auto":
            positive += ("desirable_weight",)
        for name in positive:  # 0 would silently train nothing (alpha 0: LoRA scale 0)
            value = getattr(self, name)
            if value is not None and float(value) <= 0:
                raise _bad(name, f"must be > 0 (got {value})")
        for name in ("max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise _bad(name, f"must be >= 0 (got {getattr(self, name)})")
        for name, lo in _INT_MINIMA.items():
            value = getattr(self, name)
            if value is not None and value < lo:
                raise _bad(name, f"must be >= {lo} (got {value}){_INT_HINTS.get(name, '')}")
        for name in ("num_layers", "eval_batches"):  # -1 = all; 0 would also mean all
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise _bad(name, f"must be -1 (all) or >= 1 (got {value})")
        if not 0 <= self.seed < 2**32:
            raise _bad("seed", f"must be in [0, 2**32) (got {self.seed})")
        if self.max_length < 2:
            raise _bad("max_length", f"must be >= 2 (got {self.max_length})")
        if self.quantize is not None and self.quantize not in QUANT_BITS:
            raise _bad(
                "quantize",
                f"{self.quantize} bits is not supported by MLX (use one of "
                f"{', '.join(map(str, QUANT_BITS))})",
            )
        if self.q_group_size not in QUANT_GROUP_SIZES:
            # MLX refuses other sizes; mlx-lm then skips every layer: an unquantized model
            raise _bad(
                "q_group_size",
                f"{self.q_group_size} is not supported by MLX (use one of "
                f"{', '.join(map(str, QUANT_GROUP_SIZES))})",
            )
        if self.dtype not in (None, "float16", "bfloat16", "float32"):
            raise _bad("dtype", f"'{self.dtype}' is not float16, bfloat16 or float32")
        if not 0 <= self.lora_dropout < 1:
            raise _bad("lora_dropout", f"must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_keys is not None:
            keys = [k.strip() for k in self.lora_keys]
            if not keys or any(not k for k in keys):
                raise _bad(
                    "lora_keys", "needs module names, e.g. self_attn.q_proj,self_attn.v_proj"
                )
            self.lora_keys = keys
        if self.max_bad_steps < 1:
            raise _bad("max_bad_steps", f"must be >= 1 (got {self.max_bad_steps})")
        from mlx_kto.config.compat import validate_habits

        validate_habits(self)
        return self

    def rows_per_step(self, world_size: int = 1) -> int:
        """Rows of one optimizer step: micro-batch x accumulation x ranks."""
        return self.batch_size * self.grad_accumulation_steps * world_size

    @property
    def scale(self) -> float:
        """LoRA scale (mlx-lm) = alpha / rank (PEFT), unless lora_scale is given."""
        if self.lora_scale is not None:
            return float(self.lora_scale)
        if self.lora_alpha is None:
            return 20.0  # mlx-lm's default
        return float(self.lora_alpha) / self.lora_rank

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_choices() -> dict[str, tuple]:
    """{field: its allowed values} for every field with a fixed set of choices."""
    return {
        f.name: f.metadata["choices"]
        for f in dataclasses.fields(KTOConfig)
        if "choices" in f.metadata
    }


def check_rows_per_step(cfg: KTOConfig, world_size: int) -> None:
    """'kto' takes its reference point over an optimizer step's rows: it needs at least 2."""
    if cfg.loss_type == "kto" and cfg.rows_per_step(world_size) < 2:
        raise _bad(
            "batch_size",
            f"'kto' needs at least 2 rows per optimizer step to estimate its KL "
            f"reference point (micro-batch {cfg.batch_size} x grad_accumulation_steps "
            f"{cfg.grad_accumulation_steps} x {world_size} rank(s)); raise "
            "--grad-accumulation-steps or --batch-size, or use --loss-type apo_zero_unpaired, "
            "which has no KL term",
        )


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(KTOConfig)]


def _coerce(name: str, value: Any, where: str) -> Any:
    """Coerce a YAML value to the field's declared type, or raise UserError."""
    f = {f.name: f for f in dataclasses.fields(KTOConfig)}[name]
    t = str(f.type)
    if value is None:
        return None
    try:
        if name == "desirable_weight":
            return value if isinstance(value, str) else float(value)
        if t.startswith("bool"):
            if isinstance(value, bool):
                return value
            raise ValueError
        if t.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if t.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if t.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise UserError(
            f"{where}: field '{name}' has a bad value {value!r} (expected {t})"
        ) from None
    return value


def load_yaml(path: str | Path, log=None) -> dict:
    """Read a YAML config into a dict of known fields; unknown keys are errors. mlx-lm and
    TRL names are mapped (config_compat; notes to `log`, default stderr); relative paths
    resolve against the file's folder."""
    from mlx_kto.config.compat import translate

    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder, expected a YAML file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of field: value")
    if log is None:
        log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    values = translate(raw, path, set(field_names()), log)
    return {name: _coerce(name, value, str(path)) for name, value in values.items()}


def make_config(yaml_path: str | Path | None = None, **overrides) -> KTOConfig:
    """Build a validated config: defaults < YAML file < explicit overrides (None = unset)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KTOConfig(**values).validate()
