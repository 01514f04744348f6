"""Where training progress goes besides metrics.jsonl: callbacks and loggers.

A `Callback` hears about the run (`on_train_begin`, `on_step` with each step's record,
`on_eval` with evaluation metrics, `on_save` with each checkpoint, `on_train_end` with the
result). The Python API's callbacks and `--report-to wandb,tensorboard` are both Callbacks,
so the CLI and the API report through the same code.

- wandb: `wandb.init(project=..., name=..., dir=ADAPTER_PATH)`; without an API key
  (WANDB_API_KEY or a `wandb login` in ~/.netrc) and no WANDB_MODE it logs offline (sync
  later with `wandb sync`), so a run never stops to ask for a login.
- tensorboard: tensorboardX's SummaryWriter, else torch.utils.tensorboard's, writing to
  ADAPTER_PATH/runs/RUN_NAME.
Keys follow TRL / transformers: "train/loss", "train/rewards/chosen", ..., "eval/loss",
"train/learning_rate", "train/epoch" (fractional).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlx_kto.config.compat import report_targets
from mlx_kto.errors import UserError
from mlx_kto.runtime import torchless as _torchless

# Record keys that are bookkeeping, not curves.
_NOT_LOGGED = {"step"}


class Callback:
    """Hooks called by the training loop; override the ones you need (all no-ops here)."""

    def on_train_begin(self, info: dict) -> None:
        """Once before the first step: {"steps", "rows", "run_dir", "config"}."""

    def on_step(self, record: dict) -> None:
        """After every optimizer step with its metrics.jsonl record (step, loss, ...)."""

    def on_eval(self, step: int, metrics: dict) -> None:
        """After an evaluation on the validation rows (mid-run and final)."""

    def on_save(self, step: int, path: Path) -> None:
        """After a checkpoint / the adapter was written under `path`."""

    def on_train_end(self, result: Any) -> None:
        """Once at the end, with the TrainResult."""


class CallbackList(Callback):
    """Several callbacks as one (called in order)."""

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks = list(callbacks or [])

    def on_train_begin(self, info):
        for c in self.callbacks:
            c.on_train_begin(info)

    def on_step(self, record):
        for c in self.callbacks:
            c.on_step(record)

    def on_eval(self, step, metrics):
        for c in self.callbacks:
            c.on_eval(step, metrics)

    def on_save(self, step, path):
        for c in self.callbacks:
            c.on_save(step, path)

    def on_train_end(self, result):
        for c in self.callbacks:
            c.on_train_end(result)

    def close(self) -> None:
        for c in self.callbacks:
            close = getattr(c, "close", None)
            if close is not None:
                close()


class FunctionCallback(Callback):
    """Plain functions as a Callback: on_step(record), on_eval(step, metrics), on_save(step, path)."""

    def __init__(self, on_step=None, on_eval=None, on_save=None):
        self._step, self._eval, self._save = on_step, on_eval, on_save

    def on_step(self, record):
        if self._step:
            self._step(record)

    def on_eval(self, step, metrics):
        if self._eval:
            self._eval(step, metrics)

    def on_save(self, step, path):
        if self._save:
            self._save(step, path)


def scalars(record: dict, prefix: str = "train/") -> dict[str, float]:
    """TRL-style names of the numeric values of a record: "eval/..." kept, the rest
    prefixed with `prefix`; `lr` is reported as `learning_rate`."""
    out = {}
    for k, v in record.items():
        if k in _NOT_LOGGED or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k == "lr":
            k = "learning_rate"
        out[k if k.startswith("eval/") else prefix + k] = float(v)
    return out


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbReporter(Callback):
    def __init__(self, project: str, name: str, run_dir: Path, config: dict, log: Callable):
        try:
            import wandb
        except ImportError:
            raise UserError("report_to: wandb is not installed (pip install wandb)") from None
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _has_wandb_key():
            mode = "offline"
            log(
                f"wandb: no API key found, logging offline under {run_dir}/wandb "
                "(upload later with `wandb sync`; set WANDB_API_KEY to log online)"
            )
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), config=config, mode=mode
        )

    def on_step(self, record):
        self.run.log(scalars(record), step=record["step"])

    def on_eval(self, step, metrics):
        self.run.log(scalars({f"eval/{k}": v for k, v in metrics.items()}), step=step)

    def close(self):
        self.run.finish()


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    _torchless.allow()  # a command process keeps torch out until something needs it
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        raise UserError(
            "report_to: tensorboard needs tensorboardX (pip install tensorboardX) or torch "
            "with tensorboard (pip install tensorboard)"
        ) from None


class TensorBoardReporter(Callback):
    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.writer = _summary_writer()(str(logdir))

    def on_step(self, record):
        for k, v in scalars(record).items():
            self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def on_eval(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"eval/{k}", float(v), step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def make_reporters(cfg, run_dir: Path, log: Callable[[str], None] = print) -> list[Callback]:
    """The loggers `cfg.report_to` names (missing packages: UserError naming the fix)."""
    out: list[Callback] = []
    name = cfg.run_name or Path(run_dir).resolve().name
    for target in report_targets(cfg.report_to):
        if target == "wandb":
            out.append(
                WandbReporter(cfg.project_name or "mlx-kto", name, run_dir, cfg.to_dict(), log)
            )
        elif target == "tensorboard":
            out.append(TensorBoardReporter(Path(run_dir) / "runs" / name))
            log(f"tensorboard: logging to {Path(run_dir) / 'runs' / name}")
    return out


def ref_step_stats(before: dict, after: dict) -> dict:
    """Reference-pass work of one step (`ref_hits`, `ref_misses`, `ref_forwards`,
    `ref_rows_computed`) and the run's running totals (`..._total`)."""
    keys = ("ref_forwards", "ref_rows_computed", "ref_hits", "ref_misses")
    out = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    out |= {f"{k}_total": after.get(k, 0) for k in keys}
    return out


def show_bar() -> bool:
    """A tqdm bar only on a terminal; piped or redirected output gets plain lines."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def throughput(tokens: int, seconds: float, steps: int) -> str:
    """The one throughput figure of a progress line, labelled with its window."""
    tps = tokens / seconds if seconds > 0 else 0.0
    return f"{tps:.0f} tok/s (last {steps} step{'s' if steps != 1 else ''})"
