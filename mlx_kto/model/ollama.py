"""Models in the user's Ollama store, read in place: `--model ollama:NAME[:TAG]`.

The store (as Ollama's manifest/paths.go and types/model/name.go lay it out):

    $OLLAMA_MODELS (else ~/.ollama/models)/
      manifests/HOST/NAMESPACE/MODEL/TAG   JSON: {"layers": [{"mediaType", "digest", "size"}]}
      blobs/sha256-<64 hex>                content-addressed files; the layer whose mediaType
                                           is application/vnd.ollama.image.model is a GGUF

A name is [HOST/][NAMESPACE/]MODEL[:TAG], defaults registry.ollama.ai, library, latest
(`ollama list` shows `smollm2:latest`, `user/model:tag`). Nothing here writes into the
store: a blob is checked against its manifest (size always, sha256 once per file version,
remembered in our cache folder) and then read like any GGUF file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.gguf_arch import ARCHES  # the table alone: no MLX at import
from mlx_kto.model.gguf_reader import meta, read_header
from mlx_kto.runtime.atomic import atomic_write_bytes
from mlx_kto.runtime.paths import default_cache_dir

PREFIX = "ollama:"
HOST, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
MODEL_MEDIA = "application/vnd.ollama.image.model"
ADAPTER_MEDIA = "application/vnd.ollama.image.adapter"
GGUF_MAGIC = b"GGUF"
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # no "." / ".." (path escapes)
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_CHUNK = 1 << 22
_LAST: dict[str, OllamaModel] = {}  # ref -> what this process last resolved it to (loaded)


def is_gguf_file(path: str | Path) -> bool:
    """A file named *.gguf, or any file that starts with the GGUF magic (an Ollama blob has
    no suffix)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():  # a folder, a missing path, a pipe (never read from)
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:  # unreadable: not something we can load as GGUF
        return False


def is_ollama_ref(model: str | None) -> bool:
    return bool(model) and str(model).startswith(PREFIX)


@dataclass(frozen=True)
class OllamaName:
    host: str
    namespace: str
    model: str
    tag: str

    def short(self) -> str:
        """The name as `ollama list` shows it (default host and namespace left out)."""
        head = "" if self.host == HOST else f"{self.host}/"
        if head or self.namespace != NAMESPACE:
            head += f"{self.namespace}/"
        return f"{head}{self.model}:{self.tag}"

    def parts(self) -> tuple[str, str, str, str]:
        return (self.host, self.namespace, self.model, self.tag)


def parse_name(ref: str) -> OllamaName:
    """`ollama:[HOST/][NAMESPACE/]MODEL[:TAG]` (the prefix optional) -> its four parts."""
    text = ref[len(PREFIX) :] if ref.startswith(PREFIX) else ref
    for scheme in ("https://", "http://"):
        text = text.removeprefix(scheme)
    path, _, tag = text.partition(":")
    tag = tag or TAG
    parts = path.split("/")
    if len(parts) > 3 or not all(_PART.fullmatch(p) for p in [*parts, tag]):
        raise UserError(
            f"--model (model): '{ref}' is not an Ollama model name "
            "(ollama:NAME[:TAG] or ollama:NAMESPACE/NAME[:TAG], letters, digits, _ . -)"
        )
    host, namespace = HOST, NAMESPACE
    if len(parts) == 3:
        host, namespace = parts[0], parts[1]
    elif len(parts) == 2:
        namespace = parts[0]
    if "." in namespace:
        raise UserError(f"--model (model): '{ref}': an Ollama namespace has no '.'")
    return OllamaName(host, namespace, parts[-1], tag)


def store_dir() -> Path:
    """$OLLAMA_MODELS (quotes and spaces stripped, as Ollama reads it), else ~/.ollama/models."""
    env = os.environ.get("OLLAMA_MODELS", "").strip().strip("\"'")
    return Path(env).expanduser() if env else Path.home() / ".ollama" / "models"


def list_names(store: Path) -> list[OllamaName]:
    """Every manifest in the store (HOST/NAMESPACE/MODEL/TAG files), sorted."""
    root = store / "manifests"
    if not root.is_dir():
        return []
    found = []
    for p in root.glob("*/*/*/*"):
        if p.is_file() and not p.name.startswith("."):
            found.append(OllamaName(*p.relative_to(root).parts))
    return sorted(found, key=lambda n: n.short())


def _find_manifest(name: OllamaName, store: Path) -> Path:
    """The manifest file of `name`; names match case-insensitively, as Ollama's do."""
    exact = store / "manifests" / Path(*name.parts())
    if exact.is_file():
        return exact
    names = list_names(store)
    folded = [
        n for n in names if [p.lower() for p in n.parts()] == [p.lower() for p in name.parts()]
    ]
    if len(folded) == 1:
        return store / "manifests" / Path(*folded[0].parts())
    if not (store / "manifests").is_dir():
        raise UserError(
            f"--model (model): ollama:{name.short()}: no Ollama store at {store} (no manifests "
            "folder; set OLLAMA_MODELS to the folder `ollama` keeps its models in)"
        )
    there = ", ".join(n.short() for n in names[:20]) or "none"
    more = f" (and {len(names) - 20} more)" if len(names) > 20 else ""
    raise UserError(
        f"--model (model): ollama:{name.short()} is not in the Ollama store {store} "
        f"(models there: {there}{more}; get it with `ollama pull {name.short()}`)"
    )


def _model_layer(manifest: Path) -> dict:
    """The one layer with mediaType application/vnd.ollama.image.model, checked."""
    try:
        doc = json.loads(manifest.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{manifest}: Ollama manifest is not valid JSON ({e})") from None
    except OSError as e:
        raise UserError(
            f"{manifest}: cannot read the Ollama manifest ({e.strerror or e})"
        ) from None
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
        raise UserError(f"{manifest}: Ollama manifest has no 'layers' list")
    media = [str(x.get("mediaType")) for x in layers]
    models = [x for x in layers if x.get("mediaType") == MODEL_MEDIA]
    if not models:
        raise UserError(
            f"{manifest}: Ollama manifest has no model layer ({MODEL_MEDIA}); its layers: "
            f"{', '.join(media) or 'none'} (a model Ollama stores as tensors, not one GGUF, "
            "cannot be read)"
        )
    if len(models) > 1:
        raise UserError(f"{manifest}: Ollama manifest has {len(models)} model layers; expected one")
    if ADAPTER_MEDIA in media:  # we would train on the base without it: silently different
        raise UserError(
            f"{manifest}: this Ollama model carries a LoRA adapter layer on top of its base; "
            "train on the base model's name instead (see its Modelfile: `ollama show --modelfile`)"
        )
    layer = models[0]
    m = _DIGEST.fullmatch(str(layer.get("digest", "")))
    size = layer.get("size")
    if m is None or not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UserError(
            f"{manifest}: model layer needs a digest sha256:<64 hex> and an integer size "
            f"(got digest {layer.get('digest')!r}, size {size!r})"
        )
    return {"hex": m.group(1).lower(), "size": size}


@dataclass(frozen=True)
class OllamaModel:
    """A resolved `ollama:` reference: its name, manifest and the GGUF blob it points to."""

    name: OllamaName
    store: Path
    manifest: Path
    blob: Path
    digest: str  # "sha256:<hex>", the blob's name in the manifest
    size: int


def resolve_ollama(ref: str, verify: bool = True) -> OllamaModel:
    """The GGUF blob of `ollama:NAME[:TAG]`, checked: present, the manifest's size, the
    manifest's sha256 (once per file version, see `check_sha256`), GGUF magic."""
    name = parse_name(ref)
    store = store_dir()
    manifest = _find_manifest(name, store)
    layer = _model_layer(manifest)
    blob = store / "blobs" / f"sha256-{layer['hex']}"
    digest, want = f"sha256:{layer['hex']}", layer["size"]
    if not blob.is_file():
        partial = sorted(blob.parent.glob(f"{blob.name}-partial*"))
        why = "a partial download" if partial else "missing"
        raise UserError(
            f"ollama:{name.short()}: model blob {blob} is {why} "
            f"(finish it with `ollama pull {name.short()}`)"
        )
    got = blob.stat().st_size
    if got != want:
        raise UserError(
            f"ollama:{name.short()}: model blob {blob} has {got} bytes, its manifest says {want} "
            f"(truncated or a partial download: `ollama pull {name.short()}` again)"
        )
    if verify:
        check_sha256(blob, layer["hex"], name)
    if not is_gguf_file(blob):
        raise UserError(f"ollama:{name.short()}: model blob {blob} is not a GGUF file")
    _check_architecture(blob, name)
    _LAST[ref] = OllamaModel(name, store, manifest, blob, digest, want)
    return _LAST[ref]


def _check_architecture(blob: Path, name: OllamaName) -> None:
    """Refuse up front, by the name the user typed, a GGUF architecture we cannot load."""
    arch = meta(read_header(blob), "general.architecture")
    if arch not in ARCHES:
        raise UserError(
            f"ollama:{name.short()}: GGUF architecture {arch!r} cannot be loaded "
            f"(supported: {', '.join(ARCHES)}); blob {blob}"
        )


def _verified_marker(hex_digest: str) -> Path:
    return default_cache_dir() / "ollama_verified" / hex_digest


def check_sha256(blob: Path, hex_digest: str, name: OllamaName) -> None:
    """The blob's bytes hash to its name (a partial or damaged file never trains). Hashing
    4 GB takes seconds, so a verified (size, mtime_ns) is remembered in our cache folder."""
    st = blob.stat()
    stamp = f"{st.st_size} {st.st_mtime_ns}\n".encode()
    marker = _verified_marker(hex_digest)
    try:
        if marker.read_bytes() == stamp:
            return
    except OSError:
        pass
    h = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    if h.hexdigest() != hex_digest:
        raise UserError(
            f"ollama:{name.short()}: model blob {blob} does not match its sha256 (damaged or "
            f"partly written: `ollama rm {name.short()}` and `ollama pull {name.short()}`)"
        )
    try:  # only a speed-up: a read-only cache folder just means hashing again next time
        marker.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(marker, stamp)
    except (OSError, UserError):
        pass


def provenance(model: str | None) -> dict:
    """{"ollama": {"name", "digest"}} for an `ollama:` base (else {}): adapter_config.json
    records which blob the name meant (the one this process loaded), since `ollama pull`
    moves a tag to new weights."""
    if not is_ollama_ref(model):
        return {}
    m = _LAST.get(model) or resolve_ollama(model, verify=False)
    return {"ollama": {"name": m.name.short(), "digest": m.digest}}
