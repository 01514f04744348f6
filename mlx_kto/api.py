"""The Python API: KTO on a model and tokenizer you already loaded, rows in memory.

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

Rows are any shape `mlx-kto train` reads from a file (data formats in the README), as a
list of dicts or a `datasets.Dataset`. `args` is a KTOConfig, a dict of its fields, or a
YAML path (mlx-lm and TRL names accepted there). The model is changed in place (LoRA layers
inserted), as PEFT's get_peft_model does; `model_path` (the base folder) turns on the
reference-log-prob cache. The CLI's `train` runs the same `train_model`; `train(resume=RUN)`
continues a run from its newest checkpoint, as `mlx-kto train --resume RUN` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.errors import UserError
from mlx_kto.judge.probes import training_extras
from mlx_kto.reference.scorer import make_scorer
from mlx_kto.train.callbacks import Callback, FunctionCallback
from mlx_kto.train.eval import evaluate
from mlx_kto.train.prepare import prepare_data
from mlx_kto.train.resume import config_changes, resume_config
from mlx_kto.train.run import train_model
from mlx_kto.train.setup import begin


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
    from mlx_kto.data.load import records_rows
    from mlx_kto.data.rows import examples_from_rows

    if rows is None:
        return None
    if isinstance(rows, (str, Path)):
        raise UserError(
            f"{name}: give rows (a list of dicts or a datasets.Dataset); for a file use args={{'data': ...}}"
        )
    return examples_from_rows(records_rows(rows, name), name, seed)


class KTOTrainer:
    """KTO LoRA training of a loaded mlx-lm model (see module docstring).

    Args:
        model, tokenizer: as returned by `mlx_lm.load` (the tokenizer may also be a
            transformers tokenizer).
        train_dataset: rows to train on; None reads `args.data`.
        eval_dataset: rows evaluated every `steps_per_eval` steps and at the end.
        args: KTOConfig / dict / YAML path.
        callbacks: `mlx_kto.train.callbacks.Callback` objects (on_train_begin, on_step, on_eval,
            on_save, on_train_end).
        on_step(record), on_eval(step, metrics), on_save(step, path): plain-function hooks.
        model_path: the base model's folder, to key the reference cache.
        log: where progress lines go (default: print).
    """

    def __init__(
        self,
        model,
        tokenizer,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        args: KTOConfig | dict | str | Path | None = None,
        callbacks: list[Callback] | None = None,
        on_step: Callable[[dict], None] | None = None,
        on_eval: Callable[[int, dict], None] | None = None,
        on_save: Callable[[int, Path], None] | None = None,
        model_path: str | Path | None = None,
        log: Callable[[str], None] = print,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.args = _config(args)
        if self.args.chat_template:
            from mlx_kto.model.chat_template import set_chat_template

            set_chat_template(tokenizer, self.args.chat_template)
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
        self.callbacks = list(callbacks or [])
        if on_step or on_eval or on_save:
            self.callbacks.append(FunctionCallback(on_step, on_eval, on_save))
        self.model_path = model_path
        self.log = log
        self.result = None
        self._trained = False

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
