"""`mlx-kto compare` and `mlx-kto plot`."""

from __future__ import annotations

from mlx_kto.cli.options import HELP
from mlx_kto.errors import UserError
from mlx_kto.judge.compare import CompareSettings, parse_adapter_specs, run_compare
from mlx_kto.judge.plot import plot_run

import click


@click.command("compare", context_settings=HELP)
@click.option("--model", required=True, help="Base model folder, .gguf, ollama:NAME or hub id.")
@click.option(
    "--adapter-path",
    "adapters",
    multiple=True,
    help="An adapter folder to compare with the base, as PATH or NAME=PATH (repeatable).",
)
@click.option(
    "--data",
    required=True,
    help="Held-out prompts: a data folder (its test, else valid split), a feedback file, or a "
    "prompts file (.jsonl/.json rows with prompt or messages, or one prompt per line).",
)
@click.option("--split", default=None, help="Split of a data folder.  [default: test, else valid]")
@click.option("--num-prompts", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--samples", default=4, show_default=True, type=click.IntRange(min=1), help="Per prompt."
)
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=1.0, show_default=True, type=float, help="Sampling temperature.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--chat/--no-chat",
    default=True,
    help="Give plain-text prompts of a prompts file the chat template.  [default: chat]",
)
@click.option(
    "--judge",
    default=None,
    help="A Python rule, module:function or file.py:function: (prompt, reply) -> score, or "
    "(prompt, reply_a, reply_b) -> preference (>0/'a', <0/'b', 0/'tie').",
)
@click.option(
    "--judge-model", default=None, help="A local model (folder or hub id) as pairwise judge."
)
@click.option(
    "-o", "--out", default="kto-compare", show_default=True, help="Folder for the report files."
)
@click.option("--dtype", default=None, help="Cast weights: float16, bfloat16 or float32.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the report files of an earlier compare in OUT."
)
def compare(
    model,
    adapters,
    data,
    split,
    num_prompts,
    samples,
    max_tokens,
    temp,
    seed,
    chat,
    judge,
    judge_model,
    out,
    dtype,
    overwrite,
):
    """Compare the base model and adapters on held-out prompts.

    Per model: reward accuracy and margin on labelled held-out rows, reply length,
    distinct-1/2, self-BLEU, entropy of the model on its own samples, and (with --judge or
    --judge-model) the win rate against the base. Writes OUT/compare.json, OUT/report.html
    (samples side by side, plots) and OUT/compare.png.
    """
    settings = CompareSettings(
        model=model,
        adapters=parse_adapter_specs(list(adapters)),
        data=data,
        split=split,
        num_prompts=num_prompts,
        samples=samples,
        max_tokens=max_tokens,
        temp=temp,
        seed=seed,
        chat=chat,
        judge=judge,
        judge_model=judge_model,
        out=out,
        dtype=dtype,
        overwrite=overwrite,
    )
    run_compare(settings, log=lambda m: click.echo(m, err=True), echo=click.echo)


@click.command("plot", context_settings=HELP)
@click.argument("run_dir")
@click.option("-o", "--out", default=None, help="PNG path.  [default: RUN_DIR/training.png]")
@click.option("--overwrite", is_flag=True, help="Replace an existing file at --out.")
def plot(run_dir, out, overwrite):
    """Plot a training run (loss, rewards, margins, kl, eval, diversity) from its metrics.jsonl.

    The run's own training.png is redrawn in place; another --out path that exists is
    replaced only with --overwrite."""
    path = plot_run(run_dir, out, overwrite)
    if path is None:
        raise UserError("plot: matplotlib is not installed (pip install matplotlib)")
    click.echo(str(path))
