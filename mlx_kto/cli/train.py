"""`mlx-kto train` and `mlx-kto eval` (`python -m mlx_kto.train` runs the same train)."""

from __future__ import annotations

import json

from mlx_kto import demo
from mlx_kto.cli.options import HELP, config_options
from mlx_kto.config.core import KTOConfig, load_yaml, make_config
from mlx_kto.judge.evaluate import eval_config, evaluate_adapter
from mlx_kto.judge.probes import training_extras
from mlx_kto.train.resume import resume_config
from mlx_kto.train.run import train

import click


def build_config(config_file: str | None, flags: dict) -> KTOConfig:
    """defaults < saved run config (on --resume: train.resume.resume_config) < YAML < flags."""
    if flags.get("lora_keys") is not None:
        flags["lora_keys"] = [k.strip() for k in flags["lora_keys"].split(",") if k.strip()]
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    yaml_values = load_yaml(config_file, log=log) if config_file else {}
    given = {**yaml_values, **{k: v for k, v in flags.items() if v is not None}}
    if given.get("resume"):
        return resume_config(given["resume"], given)
    return make_config(None, **given)


@click.command("train", context_settings=HELP)
@config_options
def train_command(config_file, **flags):
    """Train a KTO LoRA adapter on a model and a file of labelled feedback.

    Example: mlx-kto train --model Qwen/Qwen2.5-0.5B-Instruct --data feedback.jsonl
    """
    cfg = build_config(config_file, flags)
    if cfg.model is None and cfg.data is None:
        demo.run_demo(cfg)  # no model and no data: the embedded demo
        return
    train(cfg, log=lambda msg: click.echo(msg, err=True), extras=training_extras())


@click.command("eval", context_settings=HELP)
@click.option("--adapter-path", required=True, help="Adapter (run) folder to score.")
@click.option(
    "--model",
    default=None,
    help="Base model folder, .gguf, ollama:NAME or hub id [default: the run's].",
)
@click.option("--data", default=None, help="Feedback file or folder [default: the run's].")
@click.option(
    "--split", default="valid", show_default=True,
    type=click.Choice(["train", "valid", "validation", "val", "test"]),
    help="Split of a data folder (a single file is its own valid split).",
)  # fmt: skip
@click.option("--batch-size", default=None, type=int)
@click.option("--max-length", default=None, type=int)
@click.option("--max-prompt-length", default=None, type=int)
@click.option("--beta", default=None, type=float)
@click.option("--desirable-weight", default=None, help="A number or 'auto'.")
@click.option("--undesirable-weight", default=None, type=float)
@click.option("--loss-type", default=None)
@click.option("--dtype", default=None)
@click.option("--quantize", default=None, type=int)
@click.option("--q-group-size", default=None, type=int)
@click.option("--seed", default=None, type=int, help="Decides the KL partners.")
@click.option("--eval-batches", default=None, type=int, help="-1 = all.")
@click.option("--chat-template", default=None, help="Chat template file or text to use instead.")
def eval_command(adapter_path, split, **flags):
    """KTO loss, rewards, margins, kl and reward accuracy of an adapter on labelled data.

    Settings not given come from the run folder's kto_config.json, so the numbers equal
    the trainer's final eval; flags override them."""
    cfg = eval_config(adapter_path, **flags)
    click.echo(json.dumps(evaluate_adapter(cfg, adapter_path, split), indent=2))
