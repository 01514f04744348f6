"""`mlx-kto generate`: text from a base model and (optionally) a trained adapter."""

from __future__ import annotations

from mlx_kto.cli.options import HELP
from mlx_kto.judge.generate import generate, prompt_ids, read_prompt
from mlx_kto.judge.sample import check_sampling
from mlx_kto.model.inference import load_for_inference

import click
import mlx.core as mx


@click.command("generate", context_settings=HELP)
@click.option("--model", required=True, help="Base model folder, .gguf, ollama:NAME or hub id.")
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
    "--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling (1 = off)."
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
    check_sampling(temp, top_p, min_p, top_k, max_tokens, seed)  # before loading anything
    text = read_prompt(prompt)
    log = lambda msg: click.echo(msg, err=True)  # noqa: E731
    m, tok = load_for_inference(model, adapter_path, chat_template, log=log)
    ids = prompt_ids(tok, text, system_prompt, chat, log)
    mx.random.seed(seed)
    _, stats = generate(
        m, tok, ids, max_tokens, temp, top_p, min_p, top_k,
        on_text=lambda t: click.echo(t, nl=False),
    )  # fmt: skip
    click.echo()
    if verbose:
        for line in stats.lines():
            log(line)
