"""`mlx-kto demo`: the one-command demo."""

from __future__ import annotations

from mlx_kto.cli.options import HELP
from mlx_kto.config.core import KTOConfig
from mlx_kto.demo.real import RealDemoSizes, run_real_demo
from mlx_kto.demo.run import run_demo

import click


@click.command("demo", context_settings=HELP)
@click.option(
    "--out", default=None, help="Run folder for the adapter, metrics and plot.  [default: kto-demo]"
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Training steps.  [default: 120; 40 with --quick; 20 with --real]",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    help="Seed for data order, LoRA init and sampling.  [default: 0]",
)
@click.option(
    "--quick", is_flag=True, help="A shortened run (fewer steps and samples), as the test runs it."
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per held-out question.  [default: 16; 6 with --quick; 8 with --real]",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace a run already in the --out folder (a previous demo run is replaced anyway).",
)
@click.option(
    "--real",
    is_flag=True,
    help="KTO on SmolLM2-135M-Instruct's own replies (its GGUF): it learns to open replies "
    'with "The" (~3 min on a 2-core CPU).',
)
def demo(out, steps, seed, quick, samples, overwrite, real):
    """Train the shipped tiny model on shipped feedback and show what changed.

    No download, no data of your own: a tiny Llama that answers politely, tersely
    or rudely learns from ~400 thumbs-up/down ratings to answer politely. Prints
    the share of polite answers before and after (measured by sampling held-out
    questions), the reward margin and a few samples; writes the adapter,
    metrics.jsonl and training.png. `mlx-kto train` with no --model/--data runs
    the same demo. `--real` runs the loop on a real model's own replies instead
    (SmolLM2-135M-Instruct's GGUF, fetched by `bash .ci/fetch_smollm2.sh`).
    """
    if real:
        sizes = RealDemoSizes()
        sizes.steps = steps or sizes.steps
        sizes.heldout_samples = samples or sizes.heldout_samples
        run_real_demo(out or "kto-demo-real", sizes, seed or 0, echo=click.echo)
        return
    run_demo(
        KTOConfig(overwrite=True) if overwrite else None,
        out=out,
        steps=steps,
        seed=seed,
        quick=quick,
        samples_per_prompt=samples,
        echo=click.echo,
        log=lambda msg: click.echo(msg, err=True),
    )
