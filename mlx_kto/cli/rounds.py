"""`mlx-kto rounds` (attached to the CLI by mlx_kto.cli.app): parsing only, the loop is
`mlx_kto.rounds.run_rounds`."""

from __future__ import annotations

import copy
import dataclasses
import shlex
import sys
from pathlib import Path

from mlx_kto.cli.options import HELP, _option_for
from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError
from mlx_kto.rounds.config import TRAIN_DEFAULTS, RoundsConfig, resume_config, rounds_config
from mlx_kto.rounds.loop import run_rounds
from mlx_kto.train.guard import Interrupted

import click

# KTOConfig fields a rounds run sets itself (per round), so no flag of their own.
NOT_FLAGS = {
    "model", "data", "adapter_path", "resume", "resume_changed", "overwrite", "data_split",
    "label_field", "prompt_field", "completion_field", "messages_field", "label_threshold",
}  # fmt: skip
ROUNDS_FLAGS = {  # RoundsConfig field -> (flag, click type)
    "prompts": ("--prompts", click.STRING),
    "rounds": ("--rounds", click.INT),
    "samples_per_prompt": ("--samples-per-prompt", click.INT),
    "heldout": ("--heldout", click.STRING),
    "heldout_fraction": ("--heldout-fraction", click.FLOAT),
    "heldout_samples": ("--heldout-samples", click.INT),
    "max_tokens": ("--max-tokens", click.INT),
    "temp": ("--temp", click.FLOAT),
    "judge": ("--judge", click.STRING),
    "judge_model": ("--judge-model", click.STRING),
    "rubric": ("--rubric", click.STRING),
    "min_gain": ("--min-gain", click.FLOAT),
}


def _options(func):
    """One flag per RoundsConfig field and per KTOConfig field a round trains with."""
    train_fields = [f for f in dataclasses.fields(KTOConfig) if f.name not in NOT_FLAGS]
    for f in reversed(train_fields):
        if f.name in TRAIN_DEFAULTS:  # rounds' own default, shown in --help
            f = copy.copy(f)
            f.default = TRAIN_DEFAULTS[f.name]
        func = _option_for(f)(func)
    fields = {f.name: f for f in dataclasses.fields(RoundsConfig)}
    for name, (flag, kind) in reversed(ROUNDS_FLAGS.items()):
        f = fields[name]
        default = "" if f.default is None else f"  [default: {f.default}]"
        func = click.option(flag, name, type=kind, default=None,
                            help=f.metadata["help"] + default)(func)  # fmt: skip
    return func


@click.command("rounds", context_settings=HELP)
@click.option("--model", default=None, help="Base model: folder, .gguf file or hub id.")
@click.option(
    "--adapter-path", "out", default=None,
    help="Run folder: round-N/ (feedback.jsonl, the round's adapter), rounds.json, rounds.png.",
)  # fmt: skip
@click.option(
    "--resume", default=None,
    help="Continue the rounds run in this folder at the round and step it stopped "
    "(what is on disk is not sampled or labelled again).",
)  # fmt: skip
@_options
def rounds(model, out, resume, **flags):
    """Tuning rounds: sample the model, label each reply with your rule or a judge model,
    train a KTO round, measure on held-out prompts, repeat.

    \b
    mlx-kto rounds --model M --prompts PROMPTS --judge FILE.py:FUNC --rounds 2 \\
        --samples-per-prompt 4 --adapter-path OUT [train flags]

    --judge FILE.py:FUNC runs your own Python code: FILE is executed in this process
    and FUNC(prompt, reply) must return True (thumbs up) or False; it is loaded from
    that file only. --judge-model J --rubric TEXT asks a local model TEXT as a yes/no
    question about each (prompt, reply) instead. Round r trains from round r-1's
    adapter (its frozen reference, as --init-adapter); every round's replies go to
    OUT/round-r/feedback.jsonl as chat ratings; OUT/rounds.json holds one record per
    round (round 0 = the base). Stops early, saying why, when the held-out desirable
    share stops rising or diversity collapses (--collapse-threshold). Kill it at any
    point and continue with --resume OUT. Training flags are `mlx-kto train`'s.
    """
    settings = {k: flags.pop(k) for k in ROUNDS_FLAGS}
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    if flags.get("lora_keys") is not None:
        flags["lora_keys"] = [k.strip() for k in flags["lora_keys"].split(",") if k.strip()]
    if resume:
        if out is not None and Path(out).resolve() != Path(resume).resolve():
            raise UserError(f"--adapter-path: {out} is not the run resumed ({resume}); drop it")
        if model is not None:
            flags["model"] = model
        cfg = resume_config(resume, settings, flags)
    else:
        if out is None:
            raise UserError("--adapter-path: no run folder given (--adapter-path OUT)")
        given = {k: v for k, v in settings.items() if v is not None}
        cfg = rounds_config(train={**flags, "model": model}, out=out, **given)
    _run(cfg, resume is not None, log)


def _run(cfg: RoundsConfig, resume: bool, log) -> None:
    again = f"mlx-kto rounds --resume {shlex.quote(str(Path(cfg.out).resolve()))}"
    try:
        run_rounds(cfg, resume=resume, log=log, echo=click.echo)
    except Interrupted as e:  # Ctrl-C / SIGTERM while a round trained: checkpointed
        log(f"{e}; resume with: {again}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # while sampling or labelling: that step is redone
        log(f"interrupted; resume with: {again}")
        sys.exit(130)
