"""The `mlx-kto` command line (click). Parsing only: the work is in the library."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.config import KTOConfig, load_yaml, make_config
from mlx_kto.errors import UserError

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


def build_config(config_file: str | None, flags: dict) -> KTOConfig:
    """defaults < saved run config (on --resume) < YAML < flags."""
    if flags.get("lora_keys") is not None:
        flags["lora_keys"] = [k.strip() for k in flags["lora_keys"].split(",") if k.strip()]
    resume = flags.get("resume")
    if resume is None and config_file:
        resume = load_yaml(config_file).get("resume")
    base = {}
    if resume:
        from mlx_kto.checkpoint import find_checkpoint

        ckpt = find_checkpoint(resume)
        base = json.loads((ckpt / "trainer_state.json").read_text())["config"]
        base.pop("resume", None)
    yaml_values = load_yaml(config_file) if config_file else {}
    merged = {**base, **yaml_values, **{k: v for k, v in flags.items() if v is not None}}
    return make_config(None, **merged)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlx_kto.__version__, prog_name="mlx-kto")
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
    from mlx_kto.train import train

    cfg = build_config(config_file, flags)
    if cfg.model is None and cfg.data is None:
        # No model and no data: the embedded demo (if this install ships it).
        try:
            from mlx_kto.demo import run_demo
        except ImportError:
            raise UserError("no --model/--data given (see `mlx-kto train --help`)") from None
        run_demo(cfg)
        return
    train(cfg, log=lambda msg: click.echo(msg, err=True))


@cli.command("eval")
@click.option("--model", required=True, help="Base model folder, .gguf file or hub id.")
@click.option("--adapter-path", required=True, help="Adapter folder to score.")
@click.option(
    "--data", required=True, help="Feedback file or folder (uses valid.jsonl if present)."
)
@click.option("--split", default="valid", show_default=True, help="train, valid or test.")
@click.option("--batch-size", default=4, show_default=True, type=int)
@click.option("--max-length", default=1024, show_default=True, type=int)
@click.option("--beta", default=0.1, show_default=True, type=float)
@click.option("--loss-type", default="kto", show_default=True)
def eval_command(model, adapter_path, data, split, batch_size, max_length, beta, loss_type):
    """KTO loss, rewards, margins, kl and reward accuracy of an adapter on labelled data."""
    from mlx_kto.evaluate import evaluate_adapter

    cfg = make_config(
        None,
        model=model,
        data=data,
        batch_size=batch_size,
        max_length=max_length,
        beta=beta,
        loss_type=loss_type,
    )
    click.echo(json.dumps(evaluate_adapter(cfg, adapter_path, split), indent=2))


@cli.command("generate")
@click.option("--model", required=True, help="Base model folder, .gguf file or hub id.")
@click.option("--adapter-path", default=None, help="Adapter folder (adapters.safetensors).")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat/--no-chat", default=True, help="Apply the chat template if there is one.")
@click.option("--max-tokens", default=100, show_default=True, type=int)
@click.option("--temp", default=0.0, show_default=True, type=float, help="Sampling temperature.")
@click.option("--seed", default=0, show_default=True, type=int)
def generate_command(model, adapter_path, prompt, chat, max_tokens, temp, seed):
    """Generate text with a base model and (optionally) a trained adapter."""
    from mlx_kto.model import resolve_model_path

    import mlx.core as mx
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    path = resolve_model_path(model)
    if adapter_path and not (Path(adapter_path) / "adapters.safetensors").exists():
        raise UserError(f"adapter-path: {adapter_path} has no adapters.safetensors")
    if path.suffix.lower() == ".gguf":
        from mlx_kto.model import load_gguf_for_inference

        m, tok = load_gguf_for_inference(path, adapter_path)
    else:
        m, tok = load(str(path), adapter_path=adapter_path)
    if chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    mx.random.seed(seed)
    out = generate(m, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(temp=temp))
    click.echo(out)


@cli.group("data")
def data_group():
    """Inspect feedback data."""


@data_group.command("check")
@click.argument("path")
@click.option("--model", default=None, help="Also tokenize with this model's tokenizer.")
@click.option("--max-length", default=1024, show_default=True, type=int)
def data_check(path, model, max_length):
    """Validate a feedback file/folder and print its class balance."""
    from mlx_kto.data import load_splits
    from mlx_kto.tokenize import balance_report, tokenize_examples

    splits = load_splits(path)
    for name, examples in splits.items():
        n_d = sum(e.label for e in examples)
        click.echo(f"{name}: {len(examples)} rows")
        for line in balance_report(n_d, len(examples) - n_d, 1.0, 1.0):
            click.echo(f"  {line}")
        if model:
            from mlx_kto.model import resolve_model_path

            from mlx_lm.utils import load_tokenizer

            mpath = resolve_model_path(model)
            if mpath.suffix.lower() == ".gguf":
                from mlx_kto.convert.gguf_base import load_gguf_tokenizer

                tok = load_gguf_tokenizer(mpath)
            else:
                tok = load_tokenizer(mpath)
            rows, st = tokenize_examples(examples, tok, max_length)
            if not rows:
                click.echo(f"  tokens: no usable rows ({'; '.join(st.lines())})")
                continue
            lengths = sorted(len(r.tokens) for r in rows)
            click.echo(
                f"  tokens: median {lengths[len(lengths) // 2]}, max {lengths[-1]}; "
                f"dropped {st.n_dropped_long_prompt}, truncated {st.n_truncated}"
            )


def _attach_optional_commands() -> None:
    """Commands from modules that may be absent in a partial install."""
    for mod, attr in (
        ("mlx_kto.convert.cli", "convert"),
        ("mlx_kto.cache_cli", "cache"),
        ("mlx_kto.demo.cli", "demo"),
    ):
        try:
            module = __import__(mod, fromlist=[attr])
        except ImportError:
            continue
        cli.add_command(getattr(module, attr))


_attach_optional_commands()


def run(command: click.Command, args: list[str] | None = None, prog_name: str | None = None):
    """Run a click command; user mistakes become one line on stderr and exit 2."""
    try:
        command.main(args=args, prog_name=prog_name, standalone_mode=False)
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
        click.echo("interrupted (resume with --resume ADAPTER_PATH)", err=True)
        sys.exit(130)


def main() -> None:
    run(cli, prog_name="mlx-kto")


if __name__ == "__main__":
    main()
