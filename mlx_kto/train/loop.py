"""The training loop: optimizer steps from `run.state.step` to `run.n_steps`, each one
`step.run_step` (references and the KL reference point, then the gradient passes; see
step.py), with reporting, mid-run evaluation, checkpoints and the stop guards around it.

Per step, in order: snapshot for a second Ctrl-C (guard), seed dropout from (seed, step,
rank), run the step, check it was finite (guard), write its record (metrics.jsonl,
callbacks, progress), evaluate / probe / checkpoint when due. The final state is always
checkpointed, so `--resume` can extend a finished run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlx_kto.model.load import save_adapter
from mlx_kto.model.logit_stats import logit_stats, packed_logit_stats
from mlx_kto.model.packed import can_pack
from mlx_kto.runtime.atomic import append_line
from mlx_kto.train import stepfns
from mlx_kto.train.callbacks import ref_step_stats, show_bar, throughput
from mlx_kto.train.dpo import is_paired, iterate_pair_steps
from mlx_kto.train.eval import evaluate, format_eval
from mlx_kto.train.fast_paths import checkpoint_paths, fast_paths, run_fast_paths
from mlx_kto.train.run_dir import truncate_metrics
from mlx_kto.train.schedule import batches_per_epoch, make_schedule, min_batch, total_steps
from mlx_kto.train.state import Run, TrainState, save_run_checkpoint
from mlx_kto.train.step import StepData, iterate_steps, run_step
from mlx_kto.train.stepfns import StepFns, make_step_fns, make_train_step

import mlx.core as mx
from tqdm import tqdm

# Importable from here as before the split (tests, bench/, the packing work).
__all__ = [
    "MetricsLog",
    "Run",
    "TrainState",
    "checkpoint_paths",
    "evaluate",
    "fast_paths",
    "make_schedule",
    "make_step_fns",
    "make_train_step",
    "total_steps",
    "train_loop",
]


def __getattr__(name: str):
    if name == "grouped_steps_run":  # a live counter of stepfns (tests, benchmarks)
        return stepfns.grouped_steps_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class MetricsLog:
    """Append-only metrics.jsonl (one JSON object per line, flushed each write)."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines from steps the checkpoint never reached (and a torn one).
            truncate_metrics(path, truncate_after_step)
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        append_line(self.f, self.path, json.dumps(record) + "\n")  # disk full: one line

    def close(self) -> None:
        self.f.close()


def train_loop(run: Run, progress: bool = True) -> dict:
    """Run optimizer steps run.state.step..run.n_steps inside the CPU fast paths; returns
    the last step's metrics record. `progress`: a tqdm bar on a terminal (rank 0)."""
    with run_fast_paths(run.model, run.cfg):
        return _loop(run, progress)


def _loop(run: Run, progress: bool) -> dict:
    cfg, state, dist = run.cfg, run.state, run.dist
    fns = make_step_fns(run.model, run.optimizer, cfg, run.desirable_weight, dist)
    steps = _step_data(run)
    dist.hint = f"resume from the last checkpoint with --resume {run.run_dir}"
    out = Progress(run, progress)
    run.model.train()
    last, first = {}, state.step + 1
    mx.reset_peak_memory()
    while state.step < run.n_steps:
        record, data = _one_step(run, fns, steps, out)
        last = record
        _report(run, record, data, out)
        if dist.is_main and cfg.steps_per_save and state.step % cfg.steps_per_save == 0:
            if state.step < run.n_steps:
                save_run_checkpoint(run)
                save_adapter(run.model, run.run_dir, run.adapter_config)
                run.callbacks.on_save(state.step, run.run_dir)
        if run.guard.stop_requested:  # SIGINT / SIGTERM: the final checkpoint below, then exit
            break
    out.close_bar()
    if not run.guard.stop_requested:  # every step skipped: no checkpoint, no adapter
        run.guard.divergence.check_trained(first, state.step)
    if dist.is_main:  # the final state, always: `--resume` can extend a finished run
        save_run_checkpoint(run)
        run.callbacks.on_save(state.step, run.run_dir)
        out.close()
    return last


def _step_data(run: Run):
    """StepData of every global batch from the saved data position, forever."""
    cfg, state = run.cfg, run.state
    if is_paired(cfg):
        return iterate_pair_steps(
            run.train_rows, cfg, run.dist, state.epoch, state.batch, run.pad_id
        )
    return iterate_steps(
        run.train_rows,
        cfg,
        run.dist,
        start_epoch=state.epoch,
        start_batch=state.batch,
        pad_id=run.pad_id,
        with_kl=cfg.loss_type == "kto",
        min_size=min_batch(cfg),
    )


def _one_step(run: Run, fns: StepFns, steps, out: Progress) -> tuple[dict, StepData]:
    """One optimizer step, the state advanced; returns its metrics record and its data."""
    cfg, state, dist, scorer = run.cfg, run.state, run.dist, run.scorer
    run.guard.begin_step(run.model, run.optimizer, state)
    t0 = time.perf_counter()
    ref_s0, ref_before = scorer.seconds, scorer.stats()
    # Dropout randomness is a function of (seed, step, rank), so a resumed run replays it.
    mx.random.seed(cfg.seed * 1_000_003 + state.step + 7919 * dist.rank)
    data = next(steps)
    with_kl = cfg.loss_type == "kto"
    agg, norm, ntoks = run_step(data, scorer, fns, run.model, run.optimizer, cfg, dist, with_kl)
    state.epoch, state.batch = data.epoch, data.index + 1
    if data.index + 1 == out.per_epoch:  # an epoch ended: report its reference-pass work
        out.epoch_done(data.epoch)
    skipped = run.guard.check(state.step + 1, agg["loss"], norm)  # raises Diverged if too many
    state.step += 1
    state.trained_tokens += ntoks
    dt = time.perf_counter() - t0
    out.count(ntoks)
    record = {
        "step": state.step,
        "epoch": round(state.epoch + state.batch / out.per_epoch, 4),  # fractional, as TRL
        **agg,
        "lr": float(run.optimizer.learning_rate),
        "grad_norm": norm,
        **({"skipped": True} if skipped else {}),
        "tokens": ntoks,
        "step_time": round(dt, 4),
        "tokens_per_sec": round(ntoks / dt, 1),
        "ref_time": round(scorer.seconds - ref_s0, 4),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 4),
        "num_tokens": state.trained_tokens,  # TRL's name: tokens trained on so far
        **ref_step_stats(ref_before, scorer.stats()),  # this step's, and `_total`s
    }
    return record, data


def _report(run: Run, record: dict, data: StepData, out: Progress) -> None:
    """Complete the step's record (logit stats, eval, probe) and report it."""
    cfg, step, n_steps = run.cfg, run.state.step, run.n_steps
    reporting = step % cfg.steps_per_report == 0 or step == n_steps
    if reporting and data.batches and run.dist.is_main:
        # TRL's logits/chosen, logits/rejected, entropy: an extra no-grad forward on the
        # step's last micro-batch, on reporting steps only (logit_stats.py)
        b = data.batches[-1]
        if b.packed is not None and can_pack(run.model):
            passes = [[p.arrays() for p in pieces] for pieces in b.packed]
            record.update(packed_logit_stats(run.model, passes, b.labels))
        else:
            record.update(logit_stats(run.model, b.tokens, b.mask, b.labels))
    if cfg.steps_per_eval and run.valid_rows and step % cfg.steps_per_eval == 0:
        ev = evaluate(
            run.model, run.valid_rows, cfg, run.scorer, run.desirable_weight,
            cfg.eval_batches, run.pad_id,
        )  # fmt: skip
        record.update({f"eval/{k}": v for k, v in ev.items()})
        out.say(format_eval(f"eval @ {step}: ", ev))
        run.callbacks.on_eval(step, ev)
    if run.probe is not None:
        run.probe(step, record, n_steps)
    out.step_done(record, reporting)


class Progress:
    """Where a run's steps go: metrics.jsonl and the callbacks (rank 0), and a tqdm bar on
    a terminal or, piped, one plain line every `steps_per_report` steps with the
    throughput over those steps."""

    def __init__(self, run: Run, progress: bool = True):
        self.run = run
        self.is_main = run.dist.is_main
        self.metrics = None
        if self.is_main:
            self.metrics = MetricsLog(run.run_dir / "metrics.jsonl", run.state.step)
        self.bar = None
        if progress and not run.cfg.quiet and self.is_main and show_bar():  # piped: lines
            self.bar = tqdm(
                total=run.n_steps, initial=run.state.step, desc="kto", dynamic_ncols=True,
                leave=True,
            )  # fmt: skip
        self.per_epoch = batches_per_epoch(
            run.cfg, len(run.train_rows), run.dist.size, run.train_rows
        )
        self.epoch_ref = run.scorer.stats()
        self.t_window, self.tok_window, self.steps_window = time.perf_counter(), 0, 0

    def say(self, msg: str) -> None:
        """A log line, above the bar when there is one."""
        (self.bar.write if self.bar is not None else self.run.log)(msg)

    def count(self, ntoks: int) -> None:
        self.tok_window, self.steps_window = self.tok_window + ntoks, self.steps_window + 1

    def epoch_done(self, epoch: int) -> None:
        """One line per epoch: reference cache hits, misses, forwards and seconds in it."""
        now, before = self.run.scorer.stats(), self.epoch_ref
        keys = ("ref_hits", "ref_misses", "ref_forwards", "ref_seconds")
        d = {k: now.get(k, 0) - before.get(k, 0) for k in keys}
        msg = (
            f"epoch {epoch + 1}: reference {d['ref_hits']} hits, {d['ref_misses']} misses, "
            f"{d['ref_forwards']} forwards, {d['ref_seconds']:.2f}s"
        )
        if self.bar is None:
            self.run.log(msg)
        else:
            with self.bar.external_write_mode():
                self.run.log(msg)
        self.epoch_ref = now

    def step_done(self, record: dict, reporting: bool) -> None:
        if self.metrics is not None:
            self.metrics.write(record)
            self.run.callbacks.on_step(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(_postfix(record), refresh=False)
        elif self.is_main and reporting:
            now = time.perf_counter()
            tput = throughput(self.tok_window, now - self.t_window, self.steps_window)
            self.run.log(f"step {record['step']}/{self.run.n_steps} {_postfix(record, tput)}")
            self.t_window, self.tok_window, self.steps_window = time.perf_counter(), 0, 0

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def _postfix(r: dict, tput: str | None = None) -> str:
    parts = [f"loss {r['loss']:.4f}"] + ([f"kl {r['kl']:.3f}"] if "kl" in r else [])
    if "rewards/margins" in r:
        parts.append(f"margin {r['rewards/margins']:+.3f}")
    parts.append(tput or f"{r['tokens_per_sec']:.0f} tok/s (this step)")
    if "eval/loss" in r:
        parts.append(f"eval {r['eval/loss']:.4f}")
    return " ".join(parts)
