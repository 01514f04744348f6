"""RoundsConfig: the settings of a tuning-rounds run, and how a run folder keeps them.

A run folder (`out`) stores its settings in `rounds_config.json` at the start; `--resume`
reads them back, so a resumed run samples, labels and trains exactly as the first process
would have. Only the settings in RESUME_MAY_CHANGE may differ on a resume (they decide when
to stop, not what is on disk).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import write_json

CONFIG_FILE = "rounds_config.json"
RESUME_MAY_CHANGE = ("rounds", "min_gain")
# Training settings of a round where rounds differ from `mlx-kto train` (a flag wins).
TRAIN_DEFAULTS = dict(
    desirable_weight="auto",  # self-sampled labels are rarely balanced: balance as train does
    steps_per_save=10,  # a killed round resumes at most 10 steps back
    steps_per_eval=0,  # a round's data is one file: no validation split to evaluate
)


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RoundsConfig:
    prompts: Any = _f(
        None,
        'Training prompts: a .jsonl of {"prompt": text or messages} rows, or a .txt with one '
        "prompt per line (the Python API also takes a list of texts / message lists).",
    )
    out: str = _f(
        "kto-rounds", "Run folder: round-N/ (feedback, adapter), rounds.json, rounds.png."
    )
    rounds: int = _f(2, "Rounds of sample -> label -> train -> evaluate.")
    samples_per_prompt: int = _f(4, "Replies sampled per training prompt in each round.")
    heldout: Any = _f(
        None, "Held-out prompts file (same formats as the prompts); never trained on."
    )
    heldout_fraction: float = _f(
        0.2, "Without a held-out file: this share of the prompts, a seeded draw, is held out."
    )
    heldout_samples: int | None = _f(
        None,
        "Replies sampled per held-out prompt to measure a round (default: samples-per-prompt).",
    )
    max_tokens: int = _f(64, "Most tokens per sampled reply.")
    temp: float = _f(1.0, "Sampling temperature (1 = the model's own distribution).")
    judge: str | None = _f(
        None,
        "The labelling rule, FILE.py:FUNCTION, a function (prompt, reply) -> bool. It is your "
        "own code and runs in this process; it is loaded from that file only.",
    )
    judge_model: str | None = _f(
        None, "A local model (folder, .gguf or hub id) that labels each reply by --rubric."
    )
    rubric: str | None = _f(
        None, "The yes/no question the judge model answers about each (prompt, reply)."
    )
    min_gain: float = _f(
        0.0,
        "Stop when a round raises the held-out desirable share by this many points or less "
        "(-100: never stop for that).",
    )
    train: KTOConfig = field(
        default_factory=lambda: KTOConfig(**TRAIN_DEFAULTS),
        metadata={"help": "Training settings of every round (KTOConfig)."},
    )

    def validate(self, python_judge: bool = False) -> RoundsConfig:
        """Check the values; one line naming the flag. `python_judge`: a callable is given."""
        if self.rounds < 1:
            raise UserError(f"--rounds: must be >= 1 (got {self.rounds})")
        if self.samples_per_prompt < 1:
            raise UserError(f"--samples-per-prompt: must be >= 1 (got {self.samples_per_prompt})")
        if self.heldout_samples is not None and self.heldout_samples < 2:
            raise UserError(
                "--heldout-samples: must be >= 2 (self-BLEU compares a prompt's replies)"
            )
        if self.heldout_samples is None and self.samples_per_prompt < 2:
            raise UserError(
                "--samples-per-prompt 1: give --heldout-samples 2 or more (self-BLEU compares "
                "a held-out prompt's replies)"
            )
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens: must be >= 1 (got {self.max_tokens})")
        if not self.temp > 0:
            raise UserError(f"--temp: must be > 0 (got {self.temp}); rounds learn from variety")
        if self.heldout is None and not 0 < self.heldout_fraction < 1:
            raise UserError(f"--heldout-fraction: must be in (0, 1) (got {self.heldout_fraction})")
        if self.prompts is None:
            raise UserError("--prompts: no training prompts given")
        if not self.train.model:
            raise UserError("--model: no model given")
        kinds = [k for k, v in (("--judge", self.judge), ("--judge-model", self.judge_model),
                                ("a Python judge", python_judge)) if v]  # fmt: skip
        if len(kinds) > 1:
            raise UserError(f"judge: give one of {' or '.join(kinds)}, not both")
        if not kinds:
            raise UserError("judge: give --judge FILE.py:FUNCTION or --judge-model M --rubric TEXT")
        if self.judge_model and not (self.rubric or "").strip():
            raise UserError("--rubric: --judge-model needs the yes/no question it answers")
        if self.rubric and not self.judge_model:
            raise UserError("--rubric: only used with --judge-model")
        self.train.validate()
        if self.train.loss_type in ("dpo", "ipo"):
            raise UserError(
                f"--loss-type {self.train.loss_type}: rounds write unpaired thumbs-up/down "
                "ratings; use kto or apo_zero_unpaired"
            )
        return self

    @property
    def n_heldout_samples(self) -> int:
        return self.heldout_samples or self.samples_per_prompt

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        return {**d, "train": self.train.to_dict()}


def rounds_config(train: dict | None = None, **settings) -> RoundsConfig:
    """A RoundsConfig from keyword settings and a dict of training settings (KTOConfig
    fields); TRAIN_DEFAULTS fill the training fields not given."""
    train = {**TRAIN_DEFAULTS, **{k: v for k, v in (train or {}).items() if v is not None}}
    return RoundsConfig(train=make_config(None, **train), **settings)


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_doc(cfg: RoundsConfig) -> dict:
    """The settings as stored in rounds_config.json: paths absolute, prompts as JSON."""
    doc = cfg.to_dict()
    for key in ("prompts", "heldout"):
        value = doc[key]
        if isinstance(value, (str, Path)):
            doc[key] = str(Path(value).resolve())
        elif value is not None:
            doc[key] = [getattr(p, "prompt", p) for p in value]
    if cfg.judge:
        file, _, fn = cfg.judge.rpartition(":")
        doc["judge"] = f"{Path(file).resolve()}:{fn}"
    doc["out"] = str(Path(cfg.out).resolve())
    return doc


def save_config(cfg: RoundsConfig, extra: dict) -> None:
    """rounds_config.json: the settings plus `extra` (the judge's name, file hash, ...)."""
    write_json(Path(cfg.out) / CONFIG_FILE, {**settings_doc(cfg), **extra})


def load_config(out: str | Path) -> dict | None:
    """The stored settings of the run folder `out` (raw dict); None when there are none."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), dict):
        raise UserError(f"{path}: not a rounds settings file (no 'train' object)")
    return doc


def resume_config(out: str | Path, settings: dict, train: dict) -> RoundsConfig:
    """`--resume OUT`: the stored settings of OUT with the given settings / training flags
    (None = not given) laid over them; `check_resumable` then refuses a changed one."""
    doc = load_config(out)
    if doc is None:
        what = "no such folder" if not Path(out).exists() else f"no {CONFIG_FILE} in it"
        raise UserError(f"resume: {out}: not a rounds run folder ({what})")
    if not (doc.get("judge") or doc.get("judge_model") or settings.get("judge")):
        raise UserError(
            f"resume: the run in {out} was labelled by a Python function "
            f"({doc.get('judge_name')}); continue it from Python: "
            "run_rounds(config, judge=that_function, resume=True)"
        )
    names = {f.name for f in dataclasses.fields(RoundsConfig)} - {"train", "out"}
    values = {k: doc[k] for k in names if k in doc}
    values.update({k: v for k, v in settings.items() if v is not None and k in names})
    merged = {**doc["train"], **{k: v for k, v in train.items() if v is not None}}
    return RoundsConfig(out=str(out), train=make_config(None, **merged), **values)


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def check_resumable(stored: dict, cfg: RoundsConfig) -> None:
    """A resumed run must be the run on disk: every setting but RESUME_MAY_CHANGE equal."""
    now = settings_doc(cfg)
    pairs = [(k, now[k], stored.get(k)) for k in now if k not in ("train", "out")]
    pairs += [(k, v, stored["train"].get(k)) for k, v in now["train"].items()]
    for name, new, old in pairs:
        if name not in RESUME_MAY_CHANGE and not _same(new, old):
            flag = "--" + name.replace("_", "-")
            may = ", ".join("--" + n.replace("_", "-") for n in RESUME_MAY_CHANGE)
            raise UserError(
                f"resume: {flag} is {new!r}, the run in {cfg.out} has {old!r} "
                f"({Path(cfg.out) / CONFIG_FILE}); a resumed run keeps its settings (only "
                f"{may} may change): drop the flag, or start a new run in another folder"
            )
