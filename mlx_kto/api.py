"""The Python API: KTO on a model and tokenizer you already loaded, rows in memory, in the
shape of TRL's `KTOTrainer`.

    from mlx_lm import load
    from mlx_kto import KTOTrainer

    model, tokenizer = load("mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    rows = [{"prompt": "2+2?", "completion": " 4.", "label": True},
            {"prompt": "2+2?", "completion": " 5.", "label": False}, ...]
    trainer = KTOTrainer(model, tokenizer, train_dataset=rows,
                         args={"adapter_path": "adapters/run", "iters": 100, "beta": 0.1},
                         on_step=lambda record: print(record["step"], record["loss"]))
    result = trainer.train()          # a TrainResult: adapter_path, final/eval metrics
    trainer.evaluate()                # KTO metrics of the adapter on eval_dataset

A script written for TRL's KTOTrainer runs with its import line changed
(`from mlx_kto import KTOConfig, KTOTrainer`): `model` may be a folder, a .gguf file, a hub
id or a transformers model (its weights are loaded again with MLX, from its
`name_or_path`); `processing_class` is the tokenizer; `peft_config` a peft LoraConfig or
its dict (config/peft.py); `args` a KTOConfig in TRL's names; `save_model()` writes the
adapter. README "Python API" lists what differs.

Rows are any shape `mlx-kto train` reads from a file (data formats in the README), as a
list of dicts or a `datasets.Dataset`. `args` is a KTOConfig, a dict of its fields, or a
YAML path (mlx-lm and TRL names accepted there). The model is changed in place (LoRA layers
inserted), as PEFT's get_peft_model does; `model_path` (the base folder) turns on the
reference-log-prob cache. The CLI's `train` runs the same `train_model`; `train(resume=RUN)`
continues a run from its newest checkpoint, as `mlx-kto train --resume RUN` does.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.config.peft import lora_fields
from mlx_kto.data.load import records_rows
from mlx_kto.data.rows import examples_from_rows
from mlx_kto.errors import UserError
from mlx_kto.judge.probes import training_extras
from mlx_kto.model.chat_template import set_chat_template
from mlx_kto.model.load import load_base, save_adapter
from mlx_kto.reference.scorer import make_scorer
from mlx_kto.train.callbacks import Callback, FunctionCallback
from mlx_kto.train.eval import evaluate
from mlx_kto.train.prepare import prepare_data
from mlx_kto.train.resume import config_changes, resume_config
from mlx_kto.train.run import train_model
from mlx_kto.train.setup import begin

import mlx.nn as nn

REF_MODEL = (
    "ref_model: mlx-kto's reference is the base model with the adapter switched off (what TRL "
    "does with a peft_config), so no second model is loaded; pass ref_model=None (to start "
    "from a trained adapter, frozen as the reference, set args init_adapter)"
)


def _config(args: KTOConfig | dict | str | Path | None) -> KTOConfig:
    if args is None:
        return KTOConfig().validate()
    if isinstance(args, KTOConfig):
        return args.validate()
    if isinstance(args, dict):
        return make_config(None, **args)
    if isinstance(args, (str, Path)):
        return make_config(args)
    raise UserError(f"args: expected a KTOConfig, a dict or a YAML path, got {type(args).__name__}")


def rows_to_examples(rows: Any, name: str, seed: int = 0) -> list:
    """Validated Examples of in-memory rows (list of dicts or datasets.Dataset), located as
    "name[i]" in errors."""
    if rows is None:
        return None
    if isinstance(rows, (str, Path)):
        raise UserError(
            f"{name}: give rows (a list of dicts or a datasets.Dataset); for a file use args={{'data': ...}}"
        )
    if isinstance(rows, dict) and any(hasattr(v, "to_list") for v in rows.values()):
        raise UserError(
            f"{name}: a dict of datasets ({', '.join(map(str, rows))}); give one, e.g. "
            f"{name}=dataset['{next(iter(rows))}']"
        )
    return examples_from_rows(records_rows(rows, name), name, seed)


def _is_model(obj: Any) -> bool:
    """An MLX module or a torch / transformers model (a forward and a config)."""
    return isinstance(obj, nn.Module) or (hasattr(obj, "forward") and hasattr(obj, "config"))


def _is_class(obj: Any, name: str) -> bool:
    return any(c.__name__.startswith(name) for c in type(obj).__mro__)


def _quantize_of(quantization_config: Any, model: Any) -> dict:
    """KTOConfig's quantize for TRL's quantization_config (BitsAndBytesConfig or its dict) or a
    torch model loaded in 4 / 8 bits; {} for none."""
    q = quantization_config
    get = q.get if isinstance(q, dict) else lambda k, d=None: getattr(q, k, d)
    if q is not None:
        if get("load_in_4bit", False):
            return {"quantize": 4}
        if get("load_in_8bit", False):
            return {"quantize": 8}
        raise UserError(
            "quantization_config: only load_in_4bit / load_in_8bit map here (MLX's affine "
            "quantization of the base, KTOConfig quantize and q_group_size)"
        )
    if getattr(model, "is_loaded_in_4bit", False):
        return {"quantize": 4}
    if getattr(model, "is_loaded_in_8bit", False):
        return {"quantize": 8}
    return {}


def model_source(model: Any, cfg: KTOConfig, log: Callable[[str], None]) -> str | None:
    """Where to load the model from (a folder, .gguf file or hub id), or None for an MLX model
    given in memory. A transformers model is loaded again with MLX from its name_or_path."""
    if model is None:
        if not cfg.model:
            raise UserError(
                "model: give a model (an MLX model, a folder, a .gguf file or a hub id)"
            )
        return cfg.model
    if isinstance(model, (str, Path)):
        return str(model)
    if isinstance(model, nn.Module):
        return None
    if _is_class(model, "PeftModel"):
        raise UserError(
            "model: a PEFT model; give its base (a folder or hub id) with peft_config, or start "
            "from the adapter with args init_adapter (`mlx-kto convert from-peft` converts it)"
        )
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if _is_model(model) and path:
        log(
            f"note: model: a {type(model).__name__}; mlx-kto trains an MLX copy loaded from "
            f"{path} (the torch model is not used: pass the path to skip loading it)"
        )
        return str(path)
    raise UserError(
        f"model: expected an MLX model, a folder, a .gguf file or a hub id, got "
        f"{type(model).__name__}" + (" without a name_or_path" if _is_model(model) else "")
    )


def _tokenizer(tokenizer: Any, processing_class: Any) -> Any:
    if tokenizer is not None and _is_model(tokenizer):  # TRL's second positional: ref_model
        raise UserError(REF_MODEL)
    if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
        raise UserError("processing_class: give the tokenizer once (tokenizer or processing_class)")
    return processing_class if processing_class is not None else tokenizer


def _check_callbacks(callbacks: list | None) -> list:
    out = list(callbacks or [])
    for i, cb in enumerate(out):
        if not isinstance(cb, Callback):
            what = type(cb).__name__
            kind = " (a transformers TrainerCallback)" if _is_class(cb, "TrainerCallback") else ""
            raise UserError(
                f"callbacks[{i}]: {what}{kind} is not an mlx_kto.Callback: subclass it and "
                "override on_train_begin / on_step(record) / on_eval / on_save / on_train_end"
            )
    return out


def _refuse_trl_only(data_collator, compute_metrics, optimizers) -> None:
    if data_collator is not None:
        raise UserError(
            "data_collator: rows are tokenized and batched here (length-bucketed, padded); "
            "pass the rows as train_dataset"
        )
    if compute_metrics is not None:
        raise UserError(
            "compute_metrics: evaluation reports KTO's loss, rewards, margins, kl and reward "
            "accuracy (trainer.evaluate(), on_eval)"
        )
    if optimizers not in (None, (None, None)):
        raise UserError(
            "optimizers: the optimizer is AdamW with KTOConfig's learning_rate, lr_schedule, "
            "weight_decay and adam_bias_correction"
        )


class KTOTrainer:
    """KTO LoRA training of a model (see module docstring).

    Args:
        model: an MLX model (`mlx_lm.load`), a folder / .gguf file / hub id loaded with the
            project's loader, or a transformers model (reloaded with MLX from its name_or_path).
        tokenizer (or TRL's `processing_class`): the model's tokenizer (mlx-lm's or a
            transformers one); optional when `model` is loaded here.
        train_dataset: rows to train on; None reads `args.data`.
        eval_dataset: rows evaluated every `steps_per_eval` steps and at the end.
        args: KTOConfig (ours or TRL's names) / dict / YAML path.
        callbacks: `mlx_kto.Callback` objects (on_train_begin, on_step, on_eval, on_save,
            on_train_end).
        on_step(record), on_eval(step, metrics), on_save(step, path): plain-function hooks.
        model_path: the base model's folder, to key the reference cache (set when `model` is
            loaded here).
        log: where progress lines go (default: print).
        ref_model: None only: the reference is the base with the adapter off.
        peft_config: a peft LoraConfig or its dict: the adapter's shape (config/peft.py).
        quantization_config: TRL's (load_in_4bit / load_in_8bit) when `model` is loaded here.
        data_collator, compute_metrics, optimizers: TRL's; refused unless unset.
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        args: KTOConfig | dict | str | Path | None = None,
        callbacks: list[Callback] | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_eval: Callable[[int, dict], None] | None = None,
        on_save: Callable[[int, Path], None] | None = None,
        model_path: str | Path | None = None,
        log: Callable[[str], None] = print,
        *,
        processing_class=None,
        ref_model=None,
        peft_config: Any = None,
        quantization_config: Any = None,
        data_collator=None,
        compute_metrics=None,
        optimizers=(None, None),
    ):
        _refuse_trl_only(data_collator, compute_metrics, optimizers)
        tokenizer = _tokenizer(tokenizer, processing_class)
        if ref_model is not None:
            raise UserError(REF_MODEL)
        if isinstance(train_dataset, KTOConfig):  # TRL's positional order: model, ref_model, args
            raise UserError(
                "args: pass it by name (args=...): positional arguments here are model, "
                "tokenizer, train_dataset, eval_dataset, args"
            )
        cfg = _config(args)
        source = model_source(model, cfg, log)
        changes = {}
        if source is not None:
            changes = {"model": source, **_quantize_of(quantization_config, model)}
        elif quantization_config is not None:
            raise UserError("quantization_config: the model is loaded already (give its path)")
        if peft_config is not None:
            lora, notes = lora_fields(peft_config)
            changes.update(lora)
            log("note: peft_config: " + "; ".join(notes))
        elif source is not None:
            log(
                f"note: no peft_config: mlx-kto trains a LoRA adapter (rank {cfg.lora_rank}, "
                f"alpha {cfg.lora_alpha}; KTOConfig lora_* fields), not the full model"
            )
        self.args = dataclasses.replace(cfg, **changes).validate() if changes else cfg
        if source is not None:
            model, loaded_tokenizer, model_path, _ = load_base(self.args, log)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if tokenizer is None:
            raise UserError("processing_class: give the model's tokenizer")
        if self.args.chat_template:
            set_chat_template(tokenizer, self.args.chat_template)
        self.model, self.tokenizer, self.processing_class = model, tokenizer, tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.ref_model, self.peft_config = None, peft_config
        self.splits = None
        if train_dataset is not None:
            self.splits = {
                "train": rows_to_examples(train_dataset, "train_dataset", self.args.seed)
            }
            if eval_dataset is not None:
                self.splits["valid"] = rows_to_examples(
                    eval_dataset, "eval_dataset", self.args.seed
                )
        elif eval_dataset is not None:
            raise UserError(
                "eval_dataset: give train_dataset too (or args.data with a valid split)"
            )
        elif not self.args.data:
            raise UserError("train_dataset: no rows given and args has no data")
        self.callbacks = _check_callbacks(callbacks)
        if on_step or on_eval or on_save:
            self.callbacks.append(FunctionCallback(on_step, on_eval, on_save))
        self.model_path = model_path
        self.log = log
        self.result = None
        self._trained = False

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """TRL's save_model: the trained adapter (mlx-lm's folder format: adapters.safetensors +
        adapter_config.json) into `output_dir`, default args.adapter_path (TRL's output_dir),
        where train() wrote it already. `mlx-kto convert to-peft` makes a PEFT adapter of it."""
        if self.result is None:
            raise UserError("save_model: call train() first (training makes the adapter)")
        src = Path(self.result.adapter_path)
        dst = src if output_dir is None else Path(output_dir).expanduser()
        if dst.exists() and not dst.is_dir():
            raise UserError(f"save_model: {dst} is a file, expected a folder")
        if not dst.exists() or dst.resolve() != src.resolve():
            config = json.loads((src / "adapter_config.json").read_text())
            save_adapter(self.model, dst, config)
        return dst

    def train(
        self,
        resume: str | Path | None = None,
        resume_from_checkpoint: str | Path | bool | None = None,
    ):
        """Train; returns the TrainResult (adapter_path, steps, final_metrics, eval_metrics).

        `resume` (a run folder: its newest checkpoint; or a checkpoint folder) continues that
        run as `mlx-kto train --resume` does: the checkpoint's settings, over which the
        fields of `args` that differ from KTOConfig's defaults win. The model given must be
        the run's base (the checkpoint's adapter is loaded onto it). `resume_from_checkpoint`
        is TRL's name for it (True: the newest checkpoint in `args.adapter_path`)."""
        if self._trained:
            raise UserError("train: this trainer already trained its model; make a new one")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = self.args.adapter_path
        resume = resume or resume_from_checkpoint or self.args.resume
        cfg = self.args
        if resume:
            cfg = resume_config(resume, config_changes(self.args))
        start = begin(cfg, self.log, self.callbacks, training_extras())
        self._trained = True
        self._run_cfg = start.cfg
        self.result = train_model(start, self.model, self.tokenizer, self.model_path, self.splits)
        return self.result

    def evaluate(self, eval_dataset: Any = None) -> dict:
        """KTO loss, rewards, margins, kl and reward accuracy of the current adapter on
        `eval_dataset` (default: the one given at construction). The reference is the base."""
        if not self._trained:
            raise UserError("evaluate: call train() first (the model has no adapter yet)")
        rows = rows_to_examples(eval_dataset, "eval_dataset", self.args.seed)
        if rows is None:
            rows = (self.splits or {}).get("valid")
        if rows is None:
            raise UserError("evaluate: no eval_dataset given")
        quiet = lambda *_: None  # noqa: E731
        # As `mlx-kto eval`: the reference is the base model (adapter bypassed).
        cfg = dataclasses.replace(
            self._run_cfg,
            init_adapter=None,
            no_ref_cache=self._run_cfg.no_ref_cache or self.model_path is None,
        )
        tok_rows, _, dw = prepare_data(cfg, self.tokenizer, quiet, {"train": rows})
        scorer = make_scorer(cfg, self.model, None, self.model_path, quiet)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return evaluate(self.model, tok_rows, cfg, scorer, dw, cfg.eval_batches, pad_id)
