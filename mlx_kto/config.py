"""KTOConfig: every training setting in one dataclass, loadable from YAML.

Defaults follow the paper and TRL (beta 0.1, weights 1, max_length 1024) with a
learning rate suited to LoRA. The CLI builds one flag per field from the `help`
metadata, so `mlx-kto train --help` documents everything here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_kto.errors import UserError

LOSS_TYPES = ("kto", "apo_zero_unpaired")
KL_ESTIMATES = ("step", "micro_batch")
SCHEDULES = ("cosine", "linear", "constant")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class KTOConfig:
    # what to train
    model: str | None = _f(
        None, "Base model: local folder or Hugging Face hub id (anything mlx-lm loads)."
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
    # KTO objective
    loss_type: str = _f(
        "kto", "Loss: 'kto' or 'apo_zero_unpaired' (no KL term; allows micro-batch 1)."
    )
    beta: float = _f(0.1, "KTO beta: scale of the implied reward (paper: 0.1 close to best).")
    desirable_weight: Any = _f(
        1.0, "lambda_D, weight of desirable rows; 'auto' picks it from the class balance."
    )
    undesirable_weight: float = _f(1.0, "lambda_U, weight of undesirable rows.")
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
    lr_schedule: str = _f("cosine", "Decay after warmup: cosine, linear or constant.")
    warmup_steps: int | None = _f(None, "Linear warmup steps (default: 10% of the steps).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(1.0, "Clip the gradient to this global norm (0 disables).")
    seed: int = _f(0, "Seed for data order, KL partners, LoRA init and dropout.")
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
    quantize: int | None = _f(None, "Quantize the base to 4 or 8 bits at load (QLoRA).")
    q_group_size: int = _f(64, "Quantization group size.")
    dtype: str | None = _f(None, "Cast base weights: float16, bfloat16 or float32 (default: keep).")
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
    steps_per_save: int = _f(
        100, "Write a resumable checkpoint every N steps (0 = only at the end)."
    )
    keep_checkpoints: int = _f(2, "Keep only the newest N checkpoints (0 = keep all).")
    pad_multiple: int = _f(16, "Pad batch lengths to a multiple of this (fewer compiled shapes).")
    wired_limit_mb: int | None = _f(
        None, "Metal wired memory limit in MB (default: mlx-lm's recommended limit)."
    )
    cache_limit_mb: int | None = _f(
        None, "Cap MLX's buffer cache in MB to keep a small Mac responsive."
    )
    quiet: bool = _f(False, "Less output: no progress bar.")

    def validate(self) -> KTOConfig:
        """Check field values; raise UserError naming the field."""
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"loss_type: '{self.loss_type}' is not one of {', '.join(LOSS_TYPES)}")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(
                f"lr_schedule: '{self.lr_schedule}' is not one of {', '.join(SCHEDULES)}"
            )
        if self.batch_size < 1:
            raise UserError("batch_size: must be >= 1")
        if self.kl_estimate not in KL_ESTIMATES:
            raise UserError(
                f"kl_estimate: '{self.kl_estimate}' is not one of {', '.join(KL_ESTIMATES)}"
            )
        if self.loss_type == "kto" and self.batch_size < 2 and self.kl_estimate != "step":
            raise UserError(
                "batch_size: 'kto' with kl_estimate 'micro_batch' needs a micro-batch of at least "
                "2 rows to estimate its KL reference point; use --kl-estimate step with "
                "--grad-accumulation-steps 2 or more, --batch-size 2 or more, or --loss-type "
                "apo_zero_unpaired, which has no KL term"
            )
        if "MLX_RANK" not in os.environ:  # one process; under mlx.launch train() checks ranks
            check_rows_per_step(self, world_size=1)
        if self.distributed_timeout < 0:
            raise UserError("distributed_timeout: must be >= 0 (0 = wait forever)")
        if isinstance(self.desirable_weight, str):
            if self.desirable_weight.strip().lower() != "auto":
                try:
                    self.desirable_weight = float(self.desirable_weight)
                except ValueError:
                    raise UserError(
                        f"desirable_weight: '{self.desirable_weight}' is not a number or 'auto'"
                    ) from None
            else:
                self.desirable_weight = "auto"
        if self.desirable_weight != "auto" and float(self.desirable_weight) <= 0:
            raise UserError("desirable_weight: must be > 0")
        if self.undesirable_weight <= 0:
            raise UserError("undesirable_weight: must be > 0")
        if self.beta <= 0:
            raise UserError("beta: must be > 0")
        for name in ("grad_accumulation_steps", "epochs", "lora_rank", "max_length"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be >= 1")
        if self.iters is not None and self.iters < 1:
            raise UserError("iters: must be >= 1")
        if self.quantize not in (None, 4, 8):
            raise UserError(f"quantize: {self.quantize} bits is not supported (use 4 or 8)")
        if self.dtype not in (None, "float16", "bfloat16", "float32"):
            raise UserError(f"dtype: '{self.dtype}' is not float16, bfloat16 or float32")
        if self.learning_rate <= 0:
            raise UserError("learning_rate: must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise UserError("lora_dropout: must be in [0, 1)")
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


def check_rows_per_step(cfg: KTOConfig, world_size: int) -> None:
    """'kto' takes its reference point over an optimizer step's rows: it needs at least 2."""
    if cfg.loss_type == "kto" and cfg.rows_per_step(world_size) < 2:
        raise UserError(
            f"batch_size: 'kto' needs at least 2 rows per optimizer step to estimate its KL "
            f"reference point (micro-batch {cfg.batch_size} x grad_accumulation_steps "
            f"{cfg.grad_accumulation_steps} x {world_size} rank(s)); raise "
            "--grad-accumulation-steps or --batch-size, or use --loss-type apo_zero_unpaired, "
            "which has no KL term"
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


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config into a dict of known fields; unknown keys are errors."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of field: value")
    names = set(field_names())
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise UserError(f"{path}: unknown field '{key}' (see `mlx-kto train --help`)")
        out[name] = _coerce(name, value, str(path))
    return out


def make_config(yaml_path: str | Path | None = None, **overrides) -> KTOConfig:
    """Build a validated config: defaults < YAML file < explicit overrides (None = unset)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return KTOConfig(**values).validate()
