"""`mlx-kto cache ...`: inspect, clear and pre-fill the reference log-prob cache.

    mlx-kto cache info                      entries, size, fingerprints
    mlx-kto cache clear [--model M]         everything, or one model's entries
    mlx-kto cache warm --model M --data D   compute a dataset's reference log-probs up front
                                            (TRL's behaviour; training then only reads them)

`warm` takes the settings that decide which sequences exist (data, max_length, seed, loss
type) and the reference fingerprint (model, quantize, dtype, init_adapter): use the same
values as for `train` (or the same `-c` YAML file), or the later run simply misses.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from mlx_kto.cli.options import HELP
from mlx_kto.config.core import make_config
from mlx_kto.errors import UserError
from mlx_kto.model.load import resolve_model_path
from mlx_kto.reference.cache import cache_source
from mlx_kto.reference.scorer import DB_NAME, RefCache, check_cache_root, default_cache_dir
from mlx_kto.train.warm import warm_cache

import click

_REF_CACHE_HELP = "Cache folder (default: $MLX_KTO_CACHE_DIR or ~/.cache/mlx_kto/reference)."


@click.group("cache", context_settings=HELP)
def cache():
    """Reference log-prob cache: info, clear, warm."""


def _open(ref_cache: str | None):
    check_cache_root(ref_cache)
    try:
        return RefCache(ref_cache)
    except (OSError, sqlite3.Error) as e:
        raise UserError(f"{cache_source(ref_cache)}: cannot open the cache ({e})") from None


def _db_path(ref_cache: str | None):
    """The cache database file, or None when there is none yet (info/clear create nothing)."""
    check_cache_root(ref_cache)
    path = (Path(ref_cache).expanduser() if ref_cache else default_cache_dir()) / DB_NAME
    return path if path.exists() else None


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@cache.command("info")
@click.option("--ref-cache", default=None, help=_REF_CACHE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the info as one JSON object.")
def info_command(ref_cache, as_json):
    """Entries, size on disk and the fingerprints (model, quantization, adapter) cached."""
    if _db_path(ref_cache) is None:
        root = ref_cache or str(default_cache_dir())
        info = {"path": f"{root}/{DB_NAME}", "bytes": 0, "entries": 0, "fingerprints": []}
    else:
        c = _open(ref_cache)
        info = c.info()
        c.close()
    if as_json:
        click.echo(json.dumps(info))
        return
    click.echo(f"{info['path']}: {info['entries']} entries, {_fmt_bytes(info['bytes'])}")
    for fp in info["fingerprints"]:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(fp["last_used"]))
        extras = [f"{k} {fp[k]}" for k in ("quantize", "dtype", "init_adapter") if fp.get(k)]
        click.echo(
            f"  {fp['fingerprint'][:12]}  {fp['entries']:>8} entries  last used {used}  "
            f"{fp.get('model', '?')}" + ("  " + ", ".join(extras) if extras else "")
        )


@cache.command("clear")
@click.option(
    "--model", default=None, help="Only this model's entries (folder, hub id or ollama:NAME)."
)
@click.option("--ref-cache", default=None, help=_REF_CACHE_HELP)
def clear_command(model, ref_cache):
    """Delete cached reference log-probs (all, or one model's)."""
    if model is not None and model.startswith(("ollama:", "lmstudio:")):
        model = str(resolve_model_path(model))  # entries record the file it resolved to
    db = _db_path(ref_cache)
    if db is None:
        if model is not None:
            raise UserError(f"--model: no cache entries recorded for '{model}' (no cache yet)")
        click.echo("removed 0 entries (no cache yet)")
        return
    c = _open(ref_cache)
    if model is None:
        n = c.clear()
    else:
        ids = c.fingerprint_ids_for_model(model)
        if not ids:
            c.close()
            raise UserError(f"--model: no cache entries recorded for '{model}' in {c.path}")
        n = c.clear(ids)
    c.close()
    click.echo(f"removed {n} entries from {c.path}")


@cache.command("warm")
@click.option("-c", "--config", "config_file", type=click.Path(), default=None,
              help="YAML config (the same file as for `mlx-kto train`).")  # fmt: skip
@click.option("--model", default=None, help="Base model: folder, .gguf, ollama:NAME or hub id.")
@click.option("--data", default=None, help="Feedback file or folder (train + valid are warmed).")
@click.option("--ref-cache", default=None, help=_REF_CACHE_HELP)
@click.option("--max-length", type=int, default=None, help="As for train.")
@click.option("--max-prompt-length", type=int, default=None, help="As for train.")
@click.option("--batch-size", type=int, default=None, help="Rows per reference forward.")
@click.option("--seed", type=int, default=None, help="As for train (decides the KL partners).")
@click.option("--loss-type", default=None, help="As for train (apo_zero_unpaired: no KL part).")
@click.option("--quantize", type=int, default=None, help="As for train.")
@click.option("--q-group-size", type=int, default=None, help="As for train.")
@click.option("--dtype", default=None, help="As for train.")
@click.option("--init-adapter", default=None, help="As for train (the frozen reference).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="As for train.")
def warm_command(config_file, **flags):
    """Compute the reference log-probs of a dataset up front (fills the same cache)."""
    cfg = make_config(config_file, **flags)
    warm_cache(cfg, log=lambda msg: click.echo(msg, err=True))
