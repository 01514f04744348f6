"""The `mlx-kto` command line (click). Parsing only: the work is in the library."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from mlx_kto import __version__
from mlx_kto.config.core import KTOConfig, load_yaml, make_config
from mlx_kto.errors import UserError
from mlx_kto.runtime import torchless as _torchless

import click


def _option_for(f: dataclasses.Field):
    name = f.name.replace("_", "-")
    help_ = f.metadata.get("help", "")
    default = f.default
    if default is not None and default != "" and not isinstance(default, bool):
        help_ += f" [default: {default}]"
    t = str(f.type)
    if t.startswith("bool"):
        if f.name.startswith("no_"):
            return click.option(f"--{name}", f.name, is_flag=True, default=None, help=help_)
        return click.option(f"--{name}/--no-{name}", f.name, default=None, help=help_)
    if f.name == "desirable_weight":
        kind = click.STRING
    elif t.startswith("int"):
        kind = click.INT
    elif t.startswith("float"):
        kind = click.FLOAT
    else:
        kind = click.STRING
    return click.option(f"--{name}", f.name, type=kind, default=None, help=help_)


def config_options(func):
    """One CLI flag per KTOConfig field (help text from the dataclass)."""
    for f in reversed(dataclasses.fields(KTOConfig)):
        func = _option_for(f)(func)
    return click.option(
        "-c",
        "--config",
        "config_file",
        type=click.Path(),
        default=None,
        help="YAML file of config fields; flags given on the command line override it.",
    )(func)


def column_options(func):
    """--label-field / --prompt-field / ... / --label-threshold (KTOConfig's mapping fields)."""
    from mlx_kto.data.columns import CONFIG_FIELDS

    for f in reversed([f for f in dataclasses.fields(KTOConfig) if f.name in CONFIG_FIELDS]):
        func = _option_for(f)(func)
    return func


def build_config(config_file: str | None, flags: dict) -> KTOConfig:
    """defaults < saved run config (on --resume) < YAML < flags."""
    if flags.get("lora_keys") is not None:
        flags["lora_keys"] = [k.strip() for k in flags["lora_keys"].split(",") if k.strip()]
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    yaml_values = load_yaml(config_file, log=log) if config_file else {}
    resume = flags.get("resume")
    if resume is None:
        resume = yaml_values.get("resume")
    base = {}
    if resume:
        from mlx_kto.train.checkpoint import find_checkpoint, read_state

        base = read_state(find_checkpoint(resume))["config"]
        # Not inherited: where to write (the folder resumed, see train.resolve_run_dir) and
        # one-off permissions.
        for key in ("resume", "adapter_path", "overwrite", "resume_changed"):
            base.pop(key, None)
    merged = {**base, **yaml_values, **{k: v for k, v in flags.items() if v is not None}}
    return make_config(None, **merged)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mlx-kto")
def cli():
    """KTO (Kahneman-Tversky Optimization) LoRA training for local models with MLX.

    Train on thumbs-up / thumbs-down feedback, then export the adapter for
    mlx-lm, PEFT or llama.cpp."""


@cli.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@config_options
def train_command(config_file, **flags):
    """Train a KTO LoRA adapter on a model and a file of labelled feedback.

    Example: mlx-kto train --model Qwen/Qwen2.5-0.5B-Instruct --data feedback.jsonl
    """
    from mlx_kto.judge.probes import training_extras
    from mlx_kto.train.run import train

    cfg = build_config(config_file, flags)
    if cfg.model is None and cfg.data is None:
        # No model and no data: the embedded demo (if this install ships it).
        try:
            from mlx_kto.demo import run_demo
        except ImportError:
            raise UserError("no --model/--data given (see `mlx-kto train --help`)") from None
        run_demo(cfg)
        return
    train(cfg, log=lambda msg: click.echo(msg, err=True), extras=training_extras())


@cli.command("eval")
@click.option("--adapter-path", required=True, help="Adapter (run) folder to score.")
@click.option(
    "--model", default=None, help="Base model folder, .gguf file or hub id [default: the run's]."
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
    from mlx_kto.judge.evaluate import eval_config, evaluate_adapter

    cfg = eval_config(adapter_path, **flags)
    click.echo(json.dumps(evaluate_adapter(cfg, adapter_path, split), indent=2))


@cli.command("generate")
@click.option("--model", required=True, help="Base model folder, .gguf file or hub id.")
@click.option("--adapter-path", default=None, help="Adapter folder (adapters.safetensors).")
@click.option("-p", "--prompt", required=True, help="Prompt text ('-' reads it from stdin).")
@click.option("--system-prompt", default=None, help="System message for the chat template.")
@click.option(
    "--chat/--no-chat",
    default=True,
    show_default=True,
    help="Apply the chat template if there is one.",
)
@click.option("--chat-template", default=None, help="Chat template file or text to use instead.")
@click.option("-m", "--max-tokens", default=100, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature.")
@click.option(
    "--top-p", default=0.0, show_default=True, type=float, help="Nucleus sampling (0 = off)."
)
@click.option(
    "--min-p", default=0.0, show_default=True, type=float, help="Min-p sampling (0 = off)."
)
@click.option("--top-k", default=0, show_default=True, type=int, help="Top-k sampling (0 = off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--verbose/--quiet", default=True, show_default=True, help="Print speed figures.")
def generate_command(
    model, adapter_path, prompt, system_prompt, chat, chat_template, max_tokens, temp, top_p,
    min_p, top_k, seed, verbose,
):  # fmt: skip
    """Generate text with a base model and (optionally) a trained adapter."""
    from mlx_kto.judge.generate import generate, prompt_ids, read_prompt
    from mlx_kto.model.load import resolve_model_path

    import mlx.core as mx
    from mlx_lm import load

    path = resolve_model_path(model)
    if adapter_path and not (Path(adapter_path) / "adapters.safetensors").exists():
        raise UserError(f"--adapter-path: {adapter_path} has no adapters.safetensors")
    try:
        if path.suffix.lower() == ".gguf":
            from mlx_kto.model.load import load_gguf_for_inference

            m, tok = load_gguf_for_inference(path, adapter_path)
        else:
            m, tok = load(str(path), adapter_path=adapter_path)
    except RuntimeError as e:  # MLX's safetensors reader: truncated or garbage weights
        what = f"--adapter-path {adapter_path}" if "lora" in str(e) else f"--model {path}"
        raise UserError(f"{what}: unreadable weights ({e})") from None
    if chat_template:
        from mlx_kto.model.chat_template import set_chat_template

        set_chat_template(tok, chat_template)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    ids = prompt_ids(tok, read_prompt(prompt), system_prompt, chat, log)
    mx.random.seed(seed)
    _, stats = generate(
        m, tok, ids, max_tokens, temp, top_p, min_p, top_k,
        on_text=lambda t: click.echo(t, nl=False),
    )  # fmt: skip
    click.echo()
    if verbose:
        for line in stats.lines():
            log(line)


@cli.group("data")
def data_group():
    """Inspect feedback data."""


@data_group.command("check")
@click.argument("path")
@click.option("--model", default=None, help="Also tokenize with this model's tokenizer.")
@click.option("--max-length", default=1024, show_default=True, type=int)
@click.option(
    "--max-prompt-length", default=None, type=int, help="As for train: keep the last N tokens."
)
@click.option("--chat-template", default=None, help="Chat template file or text (see train).")
@click.option("--data-split", default=None, help="Training split of a hub dataset id.")
@column_options
def data_check(path, model, max_length, max_prompt_length, chat_template, data_split, **mapping):
    """Validate feedback data: format, input shapes, class balance; with --model one
    rendered example (prompt/completion boundary marked) and the effect of truncation."""
    from mlx_kto.data.check import data_check_lines
    from mlx_kto.data.columns import FieldMap

    cfg = make_config(None, max_length=max_length, max_prompt_length=max_prompt_length, **mapping)
    tok = None
    if model:
        tok = _load_tokenizer(model, chat_template)
    for line in data_check_lines(
        path, tok, max_length, max_prompt_length, split=data_split, fields=FieldMap.from_config(cfg)
    ):
        click.echo(line)


def _load_tokenizer(model: str, chat_template: str | None = None):
    """mlx-lm's tokenizer of `model`, with --chat-template applied."""
    from mlx_kto.model.load import resolve_model_path

    from mlx_lm.utils import load_tokenizer

    mpath = resolve_model_path(model)
    if mpath.suffix.lower() == ".gguf":
        from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer

        tok = load_gguf_tokenizer(mpath)
    else:
        tok = load_tokenizer(mpath)
    if chat_template:
        from mlx_kto.model.chat_template import set_chat_template

        set_chat_template(tok, chat_template)
    return tok


def _attach_optional_commands() -> None:
    """Commands from modules that may be absent in a partial install."""
    for mod, attr in (
        ("mlx_kto.cli.convert", "convert"),
        ("mlx_kto.cli.cache", "cache"),
        ("mlx_kto.cli.demo", "demo"),
        ("mlx_kto.cli.rounds", "rounds"),
        ("mlx_kto.cli.judge", "compare"),
        ("mlx_kto.cli.judge", "plot"),
        ("mlx_kto.cli.collect", "chat"),
        ("mlx_kto.cli.collect", "import_command"),  # `mlx-kto data import`
    ):
        try:
            module = __import__(mod, fromlist=[attr])
        except ImportError:
            continue
        group = data_group if attr == "import_command" else cli
        group.add_command(getattr(module, attr))


_attach_optional_commands()


def run(command: click.Command, args: list[str] | None = None, prog_name: str | None = None):
    """Run a click command; user mistakes become one line on stderr and exit 2; a training
    run stopped by SIGINT / SIGTERM prints how to resume and exits 130 / 143."""
    from mlx_kto.train.guard import Interrupted

    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except Interrupted as e:
        prog = prog_name or "mlx-kto"
        train_cmd = f"{prog} train" if command is cli else prog
        resume = f"{train_cmd} --resume {shlex.quote(str(Path(e.run_dir).resolve()))}"
        click.echo(f"{e}; resume with: {resume}" if e.checkpoint else str(e), err=True)
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


def main() -> None:
    _torchless.keep_out()  # this process is a command: torch stays out (_torchless.py)
    run(cli, prog_name="mlx-kto")


if __name__ == "__main__":
    main()
