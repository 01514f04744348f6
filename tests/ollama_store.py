"""A small Ollama store built in a test folder, laid out as `ollama pull` leaves it:
manifests/HOST/NAMESPACE/MODEL/TAG (a Docker v2 manifest, JSON) and blobs/sha256-<hex>
(the GGUF as the model layer, plus template, params and config blobs). No Ollama install."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST_MEDIA = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA = "application/vnd.docker.container.image.v1+json"
TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ .Prompt }}"
PARAMS = {"stop": ["<|im_end|>"], "temperature": 0.2}


def _blob(store: Path, data: bytes | None = None, src: Path | None = None, link=True) -> dict:
    """Put bytes (or a file, hard-linked when it can be and `link`) under blobs/; its
    layer entry."""
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if src is not None:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        digest, size = h.hexdigest(), src.stat().st_size
        target = blobs / f"sha256-{digest}"
        if not target.exists():
            try:
                if not link:
                    raise OSError("copy asked for")
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)
    else:
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        (blobs / f"sha256-{digest}").write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": size}


def write_manifest(store: Path, name: str, layers: list[dict], text: str | None = None) -> Path:
    """manifests/HOST/NAMESPACE/MODEL/TAG for `name` = [[HOST/]NAMESPACE/]MODEL[:TAG]."""
    path, _, tag = name.partition(":")
    parts = path.split("/")
    parts = ["registry.ollama.ai", "library"][: 3 - len(parts)] + parts
    config = _blob(store, json.dumps({"model_format": "gguf", "model_family": "llama"}).encode())
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA,
        "config": {"mediaType": CONFIG_MEDIA, **config},
        "layers": layers,
    }
    target = store / "manifests" / Path(*parts) / (tag or "latest")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(doc) if text is None else text)
    return target


def add_model(store: Path, name: str, gguf: Path, link: bool = True) -> Path:
    """Add `gguf` as Ollama model `name` (with a template and params layer); its blob path.
    `link`: hard-link the file when it can (a test that damages the blob must copy)."""
    model = {"mediaType": "application/vnd.ollama.image.model",
             **_blob(store, src=gguf, link=link)}  # fmt: skip
    layers = [
        model,
        {"mediaType": "application/vnd.ollama.image.template", **_blob(store, TEMPLATE.encode())},
        {"mediaType": "application/vnd.ollama.image.params",
         **_blob(store, json.dumps(PARAMS).encode())},
    ]  # fmt: skip
    write_manifest(store, name, layers)
    return store / "blobs" / model["digest"].replace(":", "-")
