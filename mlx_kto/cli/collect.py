"""CLI commands of the collect stage: `mlx-kto chat` and `mlx-kto data import` (attached to
the data group by cli/data.py). Parsing only; the work is in mlx_kto.collect."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mlx_kto.cli.deps import require
from mlx_kto.cli.options import HELP
from mlx_kto.collect.chat import run_terminal_chat
from mlx_kto.collect.importers import check_output, import_open_webui
from mlx_kto.collect.session import Sampling, default_model, open_session
from mlx_kto.data.feedback import read_ratings
from mlx_kto.errors import UserError
from mlx_kto.judge.sample import check_sampling
from mlx_kto.runtime.outputs import check_out_file

import click


def _check_feedback_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"feedback: {p} is a folder; give a .jsonl file")
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        raise UserError(f"feedback: {p} should end in .jsonl (one rating per line)")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"feedback: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"feedback: {p} is not writable")
    return p


@click.command("chat", context_settings=HELP)
@click.option(
    "--model", default=None, help="Model folder or hub id.  [default: the shipped demo model]"
)
@click.option("--adapter-path", default=None, help="Adapter folder to chat with (e.g. a run).")
@click.option(
    "--feedback",
    default="feedback.jsonl",
    show_default=True,
    help="Ratings are appended here, in the format `mlx-kto train --data` reads.",
)
@click.option("--system-prompt", default=None, help="System message at the start of the chat.")
@click.option("--temp", default=0.7, show_default=True, type=float, help="Sampling temperature.")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=None, type=int, help="Sampling seed (default: random).")
@click.option("--web", is_flag=True, help="Serve the chat as a local web page instead.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--web: address to bind.")
@click.option(
    "--port",
    default=8765,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="--web: port (0 = any free port).",
)
def chat(
    model, adapter_path, feedback, system_prompt, temp, top_p, max_tokens, seed, web, host, port
):
    """Chat with a model and rate its replies; the ratings train the next adapter.

    In the terminal, after each reply press one key: u (thumbs up) or d (thumbs
    down), which saves the rating and goes on, r (regenerate), Enter (go on
    unrated) or q (quit); at the message prompt everything typed is the message,
    except /undo (retract your last rating and rate again), /new and /quit. Ctrl-C
    stops a streaming reply. With --web, open the printed URL: thumbs buttons
    under each reply, the ratings so far, undo. Then train:
    `mlx-kto train --model M --data feedback.jsonl --adapter-path run1`, and chat
    again with `--adapter-path run1`.
    """
    check_sampling(temp, top_p, max_tokens=max_tokens, seed=seed)
    fb = _check_feedback_path(feedback)
    if web:
        require("starlette", "uvicorn")  # before loading a model it could not serve
    try:
        read_ratings(fb)
    except UserError as e:  # ratings still append; training refuses the file until it is fixed
        click.echo(f"warning: {e} (training on {fb} fails until that line is fixed)", err=True)
    model = model or default_model()
    click.echo(
        f"loading {model}" + (f" with adapter {adapter_path}" if adapter_path else ""), err=True
    )
    try:
        session = open_session(
            model,
            adapter_path,
            feedback=fb,
            system_prompt=system_prompt,
            sampling=Sampling(temp=temp, top_p=top_p, max_tokens=max_tokens, seed=seed),
        )
    except KeyboardInterrupt:
        # The MLX thread is still loading and cannot be stopped; a normal exit would run
        # MLX's teardown under it (the process aborts). Nothing is unsaved at this point.
        click.echo("\ninterrupted while loading the model", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    try:
        if web:
            # Imported on use: starlette and uvicorn are optional for a partial install
            # (cli/deps.py names them when missing); only --web needs them.
            from mlx_kto.collect.web.server import serve

            serve(session, host=host, port=port, echo=click.echo)
        else:
            run_terminal_chat(session)
    finally:
        session.worker.finish()  # the reply in flight (if any) ends before the process


@click.command("import", context_settings=HELP)
@click.argument("source", type=click.Choice(["open-webui"]))
@click.argument("export")
@click.option(
    "-o",
    "--output",
    required=True,
    help="Feedback file to write: .jsonl (one row per line) or .json (a JSON list).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it is a file that exists.")
def import_command(source, export, output, force):
    """Convert ratings made elsewhere into a feedback file `mlx-kto train` reads.

    open-webui: its feedback export (Admin > Evaluations > Export, records with
    data.rating 1/-1 and snapshot.chat) or its chat export (Settings > Chats >
    Export, messages with annotation.rating). Every rated assistant message of a
    chat becomes one row; its prompt is the conversation before it. A message rated
    twice in the export (the same record id) keeps the later rating.
    """
    check_output(output)  # a name `train` cannot read is refused, --force or not
    out = check_out_file(output, force, "--force")
    n, counts = import_open_webui(export, out)
    if counts["replaced"]:
        click.echo(
            f"note: {counts['replaced']} record(s) rate a message rated earlier in the export "
            f"(same id); kept the later rating of each ({counts['changed']} changed the label)",
            err=True,
        )
    click.echo(
        f"wrote {n} rows to {out} ({counts['up']} thumbs up, {counts['down']} thumbs down"
        + (
            f"; skipped {counts['skipped']} unrated or without a rating"
            if counts["skipped"]
            else ""
        )
        + ")"
    )
