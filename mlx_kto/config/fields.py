"""KTOConfig: every training setting in one dataclass, a help string per field.

Defaults follow the paper and TRL (beta 0.1, weights 1, max_length 1024) with a
learning rate suited to LoRA. The CLI builds one flag per field from the `help`
metadata, so `mlx-kto train --help` documents everything here.

`KTOConfig(...)` also takes TRL's names (`KTOConfig(output_dir="out",
per_device_train_batch_size=8, max_steps=100)`), translated as in a YAML file
(config/compat.py), and answers TRL's attribute names (`args.output_dir`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mlx_kto.config.checks import KL_ESTIMATES, LOSS_TYPES, SCHEDULES, check_values
from mlx_kto.config.compat import translate_kwargs, trl_read
from mlx_kto.config.types import check_types


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(init=False)
class KTOConfig:
    # what to train
    model: str | None = _f(
        None,
        "Base model: local folder, .gguf file, ollama:NAME[:TAG] (the Ollama store), "
        "lmstudio:PUBLISHER/MODEL or Hugging Face hub id.",
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
    pass_tokens: int | None = _f(
        None,
        "Run a packed micro-batch in passes of at most this many tokens, each evaluated "
        "before the next: a step holds one pass's activations, not the whole micro-batch's "
        "(the same gradient; 0 = one pass; default 1024, 512 with --grad-checkpoint). "
        "Lower it to fit less memory.",
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

    def __init__(self, output_dir: str | None = None, /, **kwargs):
        """Fields by name, ours or TRL's (KTOConfig / TrainingArguments / script names):
        TRL's are translated as a YAML file's are, and one without an equivalent is refused
        by name. The one positional argument is TRL's `output_dir`."""
        if output_dir is not None:
            if "output_dir" in kwargs:
                raise TypeError("KTOConfig: output_dir given twice")
            kwargs = {"output_dir": output_dir, **kwargs}
        values = translate_kwargs(kwargs, {f.name for f in dataclasses.fields(self)})
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            object.__setattr__(self, f.name, values.get(f.name, default))

    def __getattr__(self, name: str):
        # Only for names that are not attributes: TRL's (`output_dir` -> adapter_path).
        field = trl_read(name)
        if field is None:
            raise AttributeError(f"'KTOConfig' object has no attribute '{name}'")
        value = getattr(self, field)
        return -1 if name == "max_steps" and value is None else value

    def __setattr__(self, name: str, value) -> None:
        field = trl_read(name)  # `args.output_dir = ...` sets adapter_path, never a stray name
        if field == "iters" and isinstance(value, int) and value <= 0:
            value = None  # TRL's max_steps -1: unset
        object.__setattr__(self, field or name, value)

    def validate(self) -> KTOConfig:
        """Check every field's type (config/types.py), then its value (config/checks.py);
        raise UserError naming the flag and the field."""
        check_types(self)
        check_values(self)
        return self

    def rows_per_step(self, world_size: int = 1) -> int:
        """Rows of one optimizer step: micro-batch x accumulation x ranks."""
        return self.batch_size * self.grad_accumulation_steps * world_size

    @property
    def pass_budget(self) -> int:
        """Tokens per packed pass: `pass_tokens`, else 1024, or 512 under grad_checkpoint (a
        user who checkpoints wants the memory: on the 8 longest real_h2h rows 1.21 GB of
        resident memory against 1.42 GB, at the same speed; bench/RESULTS.md)."""
        if self.pass_tokens is not None:
            return self.pass_tokens
        return 512 if self.grad_checkpoint else 1024

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


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(KTOConfig)]
