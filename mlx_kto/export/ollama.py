"""A trained run -> an Ollama model folder: `mlx-kto convert to-ollama RUN OUT --base ...`.

OUT gets `adapter.gguf` (the llama.cpp LoRA for the exact base GGUF, export/gguf_lora) and

    FROM <the base: its Ollama name, or the absolute path of the .gguf file>
    ADAPTER ./adapter.gguf

`ollama create NEW_NAME -f OUT/Modelfile` then makes a model that runs the base with the
LoRA applied (Ollama hands it to llama.cpp's --lora). FROM an Ollama name keeps that
model's template, system prompt and parameters; Ollama resolves ADAPTER relative to the
Modelfile's folder. Nothing is written into the Ollama store.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import make_parent
from mlx_kto.export.gguf_lora import to_gguf
from mlx_kto.model.lmstudio import is_lmstudio_ref, resolve_lmstudio
from mlx_kto.model.ollama import is_gguf_file, is_ollama_ref, resolve_ollama
from mlx_kto.runtime.atomic import atomic_write_bytes, clean_stale_temps, temp_path, write_error

ADAPTER_NAME = "adapter.gguf"
MODELFILE = "Modelfile"


@dataclass
class OllamaExport:
    out: Path  # the folder written
    modelfile: Path
    adapter: Path
    base_from: str  # what FROM names

    def create_command(self, new_name: str = "NEW_NAME") -> str:
        return f"ollama create {new_name} -f {shlex.quote(str(self.modelfile))}"


def _run_config(run: Path) -> dict:
    conf = run / "adapter_config.json"
    try:
        doc = json.loads(conf.read_text())
    except FileNotFoundError:
        raise UserError(f"{run}: not an adapter folder (no adapter_config.json)") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{conf}: unreadable ({e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{conf}: expected a JSON object")
    return doc


def resolve_base(base: str, run_config: dict) -> tuple[Path, str, str]:
    """(the base GGUF file, what FROM names, how to name it in messages) for --base
    ollama:NAME[:TAG], lmstudio:..., or a GGUF file. An ollama: base must still be the
    blob the run trained on (adapter_config.json records it): `ollama pull` may have moved
    the tag to new weights, on which the LoRA would silently mean something else."""
    if is_ollama_ref(base):
        m = resolve_ollama(base)
        rec = run_config.get("ollama") if isinstance(run_config.get("ollama"), dict) else {}
        trained, same_name = rec.get("digest"), str(rec.get("name", "")).lower()
        if trained and trained != m.digest and same_name == m.name.short().lower():
            raise UserError(
                f"--base {base}: the run trained on blob {trained}, the store's "
                f"{m.name.short()} is now {m.digest} (re-pulled?); export for the file it "
                "trained on (--base FILE.gguf) or train again"
            )
        return m.blob, m.name.short(), f"{base} ({m.blob})"
    path = resolve_lmstudio(base) if is_lmstudio_ref(base) else Path(base).expanduser()
    if not path.is_file() or not is_gguf_file(path):
        raise UserError(
            f"--base {base}: not a GGUF file; to-ollama needs the GGUF Ollama runs "
            "(ollama:NAME[:TAG] or FILE.gguf)"
        )
    path = path.resolve()
    if "\n" in str(path) or '"' in str(path):
        raise UserError(f"--base {path}: a path with a newline or quote cannot go in a Modelfile")
    return path, str(path), str(path)


@contextmanager
def _as_gguf_name(path: Path) -> Iterator[Path]:
    """`path` under a name ending in .gguf (to_gguf tells a GGUF base by its suffix; an
    Ollama blob has none): a symlink in a private temp folder, removed after."""
    if path.suffix.lower() == ".gguf":
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="mlx-kto-base-"))
    try:
        link = tmp / "base.gguf"
        os.symlink(path, link)
        yield link
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def store_base(base: str) -> Iterator[str]:
    """`--base` for to_gguf: an ollama: / lmstudio: name as a path to its GGUF (named
    *.gguf); anything else unchanged."""
    if not (is_ollama_ref(base) or is_lmstudio_ref(base)):
        yield base
        return
    path, _, shown = resolve_base(base, {})
    with _as_gguf_name(path) as link:
        try:
            yield str(link)
        except UserError as e:
            raise UserError(str(e).replace(str(link), shown)) from None


def modelfile_text(base_from: str) -> str:
    """The Modelfile: FROM the base, ADAPTER the LoRA beside it."""
    frm = f'"{base_from}"' if base_from != base_from.strip() else base_from
    return f"FROM {frm}\nADAPTER ./{ADAPTER_NAME}\n"


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"{out}: folder exists and is not empty (pass --overwrite to write into it)"
        )


def to_ollama(
    run: str | Path,
    out: str | Path,
    base: str | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
) -> OllamaExport:
    """Write OUT/adapter.gguf and OUT/Modelfile for the run's adapter on `base` (default:
    the run's `model`). Everything is written into a temp folder beside OUT first and moved
    into place only when complete (a new OUT appears whole; with --overwrite the adapter is
    replaced before the Modelfile that names it)."""
    run, out = Path(run), Path(out)
    conf = _run_config(run)
    base = base or conf.get("model")
    if not base:
        raise UserError(f"{run}/adapter_config.json has no 'model'; pass --base")
    base_file, base_from, shown = resolve_base(str(base), conf)
    _check_out(out, overwrite)
    make_parent(out)
    clean_stale_temps(out)
    tmp = temp_path(out)
    try:
        tmp.mkdir()
        with _as_gguf_name(base_file) as gguf_base:
            try:
                to_gguf(run, tmp / ADAPTER_NAME, base=str(gguf_base), outtype=outtype)
            except UserError as e:  # name the base as the user gave it, not the temp link
                raise UserError(str(e).replace(str(gguf_base), shown)) from None
        atomic_write_bytes(tmp / MODELFILE, modelfile_text(base_from).encode())
        if not out.exists():
            os.replace(tmp, out)
        else:
            for name in (ADAPTER_NAME, MODELFILE):
                os.replace(tmp / name, out / name)
    except OSError as e:
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OllamaExport(out, out / MODELFILE, out / ADAPTER_NAME, base_from)
