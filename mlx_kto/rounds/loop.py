"""`run_rounds`: tuning rounds without a person in every loop (`mlx-kto rounds`).

Round 0 measures the starting model on the held-out prompts. Then for r = 1..R:

1. sample K replies per training prompt from the current policy (the base, then round
   r-1's adapter), seed + r;
2. label each reply with the judge (a rule or a judge model) and write them as chat ratings
   to OUT/round-r/feedback.jsonl (meta: round, judge, sampling);
3. train a KTO round on them from round r-1's adapter, which is that round's frozen
   reference (`--init-adapter`), with `desirable_weight: auto` balancing the classes;
4. measure round r's adapter on the held-out prompts (never trained on): the desirable
   share by the same judge, distinct-n / self-BLEU / entropy, and the collapse monitor of
   `judge.probes` against round 0; stop early, saying why, when the share stops rising or
   diversity collapses.

Every step's result is an atomic file (record.py); a rerun with `resume` reads what is
there and does only what is not, and a round's training resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

from mlx_kto.data.feedback import rating_row
from mlx_kto.errors import UserError
from mlx_kto.judge.probes import collapsed, training_extras
from mlx_kto.judge.sample import Prompt, summarize
from mlx_kto.rounds import prompts as prompt_sets
from mlx_kto.rounds import record as rec
from mlx_kto.rounds.config import (
    CONFIG_FILE,
    RoundsConfig,
    check_resumable,
    file_sha256,
    load_config,
    save_config,
)
from mlx_kto.rounds.label import load_rubric_judge, load_rule_file, python_rule
from mlx_kto.rounds.policy import load_policy, release, sample, sampling_settings
from mlx_kto.rounds.report import plot, short_path, table
from mlx_kto.train.checkpoint import list_checkpoints
from mlx_kto.train.run import train
from mlx_kto.train.run_dir import existing_run_files


def run_rounds(
    config: RoundsConfig,
    judge: Callable[[str, str], bool] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Run (or, with `resume`, continue) the rounds of `config`; returns the rounds.json
    records. `judge(prompt, reply) -> bool` labels replies when given (instead of
    config.judge / config.judge_model). Progress goes to `log`, the table to `echo`."""
    cfg = config.validate(python_judge=judge is not None)
    labeller = _labeller(cfg, judge)  # a bad judge fails before any sampling
    train_q, held_q = prompt_sets.split(cfg, log)
    extra = {"judge_name": labeller.name, "judge_sha256": _judge_hash(cfg),
             "prompts_hash": _prompts_hash(train_q), "heldout_hash": _prompts_hash(held_q)}  # fmt: skip
    _claim(cfg, extra, resume, log)
    t0 = time.perf_counter()
    run = _Run(cfg, labeller, train_q, held_q, log)
    records = [rec.make_record(0, run.heldout(0), None, None)]
    _write_records(cfg, records)
    for r in range(1, cfg.rounds + 1):
        counts = run.feedback(r)
        trained = run.train(r)
        records.append(rec.make_record(r, run.heldout(r), counts, trained))
        reason = rec.stop_reason(records, cfg.min_gain, cfg.rounds)
        records[-1]["stop"] = reason
        _write_records(cfg, records)
        if reason:
            log(f"{'stopping after' if r < cfg.rounds else 'note:'} round {r}: {reason}")
            break
    run.close()
    for line in table(records):
        echo(line)
    best = rec.best_round(records)
    where = short_path(best["adapter"]) if best["adapter"] else "(the base model)"
    echo(f"best: round {best['round']} (held-out share {best['heldout_share']:.1%}), "
         f"adapter {where}")  # fmt: skip
    echo(f"wrote {Path(cfg.out) / rec.RECORDS}, {Path(cfg.out) / 'rounds.png'} "
         f"({time.perf_counter() - t0:.0f}s)")  # fmt: skip
    return records


def _labeller(cfg: RoundsConfig, judge):
    if judge is not None:
        return python_rule(judge)
    if cfg.judge:
        return load_rule_file(cfg.judge)
    return load_rubric_judge(cfg.judge_model, cfg.rubric, cfg.train.dtype)


def _judge_hash(cfg: RoundsConfig) -> str | None:
    return file_sha256(cfg.judge.rpartition(":")[0]) if cfg.judge else None


def _prompts_hash(prompts: list[Prompt]) -> str:
    return hashlib.sha256("\n".join(map(prompt_sets.key, prompts)).encode()).hexdigest()[:16]


def _claim(cfg: RoundsConfig, extra: dict, resume: bool, log) -> None:
    """Start a run in cfg.out (refused if one is there, unless resuming it) or check that the
    run there is this one: same settings, prompts and judge."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--adapter-path: {out} exists and is not a folder")
    stored = load_config(out)
    if stored is None:
        if out.exists() and any(out.iterdir()) and not (out / "round-0").exists():
            log(f"note: {out} holds other files; rounds writes round-N/ folders beside them")
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, extra)
        return
    if not resume:
        raise UserError(
            f"--adapter-path: {out} already holds a rounds run ({CONFIG_FILE}); continue it "
            f"with --resume {out}, or choose another folder"
        )
    check_resumable(stored, cfg)
    for key, what in (("prompts_hash", "--prompts"), ("heldout_hash", "the held-out prompts")):
        if stored.get(key) != extra[key]:
            raise UserError(
                f"resume: {what} differ from those the run in {out} started with (the file "
                "changed?); a resumed run must sample the same prompts: restore the file, or "
                "start a new run in another folder"
            )
    if stored.get("judge_sha256") != extra["judge_sha256"]:
        log(f"warning: {cfg.judge} changed since the run started; rounds already labelled keep "
            "their labels, the rest are labelled by the file as it is now")  # fmt: skip
    python_judge = not (cfg.judge or cfg.judge_model)  # (the others are settings, checked)
    if python_judge and stored.get("judge_name") != extra["judge_name"]:
        log(f"warning: the judge is now {extra['judge_name']} (the run started with "
            f"{stored.get('judge_name')})")  # fmt: skip
    log(f"resuming the rounds in {out}")


def _write_records(cfg: RoundsConfig, records: list[dict]) -> None:
    rec.write_artefact(Path(cfg.out) / rec.RECORDS, records)
    plot(records, Path(cfg.out) / "rounds.png")


class _Run:
    """The steps of one run, each skipped when its artefact is on disk. Holds at most one
    sampling model (the policy of the last round measured), dropped before training."""

    def __init__(self, cfg: RoundsConfig, labeller, train_q, held_q, log):
        self.cfg, self.labeller, self.train_q, self.held_q, self.log = (
            cfg, labeller, train_q, held_q, log)  # fmt: skip
        self.out = Path(cfg.out).resolve()  # records name absolute paths: resumable from anywhere
        self.loaded: tuple | None = None  # (adapter, model, tokenizer)

    def adapter(self, r: int) -> str | None:
        """The policy after round r: round 0 is the starting model (base or --init-adapter)."""
        if r:
            return str(rec.round_dir(self.out, r))
        start = self.cfg.train.init_adapter
        return str(Path(start).resolve()) if start else None

    def policy(self, adapter: str | None):
        if self.loaded is None or self.loaded[0] != adapter:
            self.close()
            self.log(f"loading {self.cfg.train.model}" + (f" + {adapter}" if adapter else ""))
            self.loaded = (adapter, *load_policy(self.cfg.train, adapter))
        return self.loaded[1], self.loaded[2]

    def close(self) -> None:
        if self.loaded is not None:
            self.loaded = None
            release()

    def label(self, prompts: list[Prompt], replies: list[list[str]]) -> list[list[bool]]:
        """The judge's labels; an empty reply is never desirable (the judge is not asked)."""
        keep = [[r for r in rs if r.strip()] for rs in replies]
        got = iter([iter(x) for x in self.labeller.label(prompts, keep)])
        out = []
        for rs in replies:
            it = next(got)
            out.append([bool(r.strip()) and next(it) for r in rs])
        return out

    def sample(self, r_policy: int, prompts, n: int, seed: int):
        model, tok = self.policy(self.adapter(r_policy))
        settings = sampling_settings(self.cfg, n, seed)
        samples = sample(model, tok, prompts, n, settings)
        return samples, [[s.text for s in per] for per in samples], settings

    def heldout(self, r: int) -> dict:
        """Round r's policy on the held-out prompts (OUT/round-r/heldout.json)."""
        path = rec.round_dir(self.out, r) / rec.HELDOUT
        doc = rec.read_json(path)
        if doc is not None:
            return doc
        t0 = time.perf_counter()
        n = self.cfg.n_heldout_samples
        self.log(f"round {r}: measuring on {len(self.held_q)} held-out prompts x {n} replies")
        samples, replies, settings = self.sample(r, self.held_q, n, self.cfg.train.seed)
        labels = self.label(self.held_q, replies)
        summary = summarize(samples)
        fallen = []
        if r:
            base = rec.read_json(rec.round_dir(self.out, 0) / rec.HELDOUT)["summary"]
            fallen = collapsed(summary, base, self.cfg.train.collapse_threshold)
        flat = [x for per in labels for x in per]
        doc = {
            "round": r, "adapter": self.adapter(r), "share": sum(flat) / len(flat),
            "summary": summary, "collapse": fallen, "sampling": settings,
            "judge": self.labeller.describe(), "seconds": round(time.perf_counter() - t0, 1),
            "prompts": [p.prompt for p in self.held_q], "replies": replies, "labels": labels,
        }  # fmt: skip
        rec.write_artefact(path, doc)
        self.log(f"round {r}: held-out desirable share {doc['share']:.1%}")
        return doc

    def feedback(self, r: int) -> dict:
        """Round r's labelled replies of the round r-1 policy (OUT/round-r/feedback.jsonl)."""
        path = rec.round_dir(self.out, r) / rec.FEEDBACK
        counts = rec.feedback_counts(path)
        if counts is None:
            k = self.cfg.samples_per_prompt
            self.log(f"round {r}: sampling {len(self.train_q)} training prompts x {k} replies")
            _, replies, settings = self.sample(r - 1, self.train_q, k, self.cfg.train.seed + r)
            labels = self.label(self.train_q, replies)
            meta = {"source": "mlx-kto rounds", "model": self.cfg.train.model,
                    "adapter": self.adapter(r - 1), "round": r,
                    "judge": self.labeller.describe(), "sampling": settings}  # fmt: skip
            rows = [
                rating_row(prompt_sets.as_messages(p), text, label, meta)
                for p, texts, labs in zip(self.train_q, replies, labels)
                for text, label in zip(texts, labs) if text.strip()
            ]  # fmt: skip
            empty = sum(len(t) for t in replies) - len(rows)
            path.parent.mkdir(parents=True, exist_ok=True)
            rec.write_feedback(path, rows)
            counts = rec.feedback_counts(path)
            self.log(f"round {r}: {counts['desirable']} of {counts['rows']} replies labelled "
                     f"desirable" + (f" ({empty} empty replies left out)" if empty else "")
                     + f" -> {path}")  # fmt: skip
        rec.check_both_classes(path, counts, self.labeller.name)
        return counts

    def train(self, r: int) -> dict:
        """Round r's KTO training from round r-1's adapter (its frozen reference), resumed
        from its latest checkpoint when a killed process left one."""
        folder = rec.round_dir(self.out, r)
        done = rec.read_json(folder / rec.TRAINED)
        if done is not None and (folder / "adapters.safetensors").is_file():
            return done
        self.close()  # training loads its own copy of the model
        cfg = dataclasses.replace(
            self.cfg.train, data=str(folder / rec.FEEDBACK), adapter_path=str(folder),
            init_adapter=self.adapter(r - 1), resume=None, overwrite=False,
        )  # fmt: skip
        found = list_checkpoints(folder)
        if found:
            cfg.resume = str(folder)
            self.log(f"round {r}: training resumes from {found[-1].name}")
        elif existing_run_files(folder):  # killed before its first checkpoint: start it again
            cfg.overwrite = True
        self.log(f"round {r}: training" + (f" from {cfg.init_adapter}" if cfg.init_adapter else ""))
        t0 = time.perf_counter()
        res = train(cfg, log=self.log, extras=training_extras())
        done = {"steps": res.steps, "loss": res.final_metrics.get("loss"),
                "seconds": round(time.perf_counter() - t0, 1), "adapter": str(res.adapter_path)}  # fmt: skip
        rec.write_artefact(folder / rec.TRAINED, done)
        return done
