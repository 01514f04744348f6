"""Models and tokenizers for the commands that only run a model (`generate`, `data check`):
a local folder, a hub id, a .gguf file or `ollama:NAME` (its GGUF blob), an optional adapter checked against the base
(mlx_kto.model.adapter_fit), an optional --chat-template. Training loads through
`load.load_base` instead (dtype, quantization and the reference fingerprint)."""

from __future__ import annotations

import sys
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.adapter_fit import adapter_base, apply_adapter
from mlx_kto.model.chat_template import set_chat_template
from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer
from mlx_kto.model.load import load_gguf_for_inference, resolve_model_path
from mlx_kto.model.ollama import is_gguf_file

import mlx.core as mx


def _check_adapter_folder(adapter_path: str | Path) -> None:
    a = Path(adapter_path)
    if not (a / "adapters.safetensors").is_file():
        raise UserError(f"--adapter-path: {a} has no adapters.safetensors")
    if not (a / "adapter_config.json").is_file():
        raise UserError(f"--adapter-path: {a} has no adapter_config.json")


def _same_place(a: str, b: Path) -> bool:
    p = Path(a).expanduser()
    return not p.exists() or p.resolve() == b.resolve()


def load_for_inference(
    model: str, adapter_path: str | None = None, chat_template: str | None = None, log=None
):
    """(model, tokenizer) in eval mode, as `mlx_lm.load(model, adapter_path=...)` gives
    them (a .gguf file through mlx_kto.model.gguf). An adapter of another base is one line
    naming both bases; one whose recorded base is another local folder gets a note."""
    from mlx_lm import load  # imports transformers: seconds of startup for every command

    log = log or (lambda msg: print(msg, file=sys.stderr))
    path = resolve_model_path(model)
    if adapter_path:
        _check_adapter_folder(adapter_path)
    try:
        if is_gguf_file(path):
            m, tok = load_gguf_for_inference(path, None, log=log)
        else:
            m, tok = load(str(path))
    except RuntimeError as e:  # MLX's safetensors reader: truncated or garbage weights
        raise UserError(f"--model {path}: unreadable weights ({e})") from None
    if adapter_path:
        try:
            m = apply_adapter(m, adapter_path, "--adapter-path", str(path))
        except RuntimeError as e:
            raise UserError(f"--adapter-path {adapter_path}: unreadable weights ({e})") from None
    m.eval()
    mx.eval(m.parameters())
    trained_on = adapter_base(adapter_path) if adapter_path else None
    if trained_on and not _same_place(trained_on, path):
        log(f"note: {adapter_path} was trained on {trained_on}; generating with {path}")
    if chat_template:
        set_chat_template(tok, chat_template)
    return m, tok


def load_tokenizer(model: str, chat_template: str | None = None):
    """mlx-lm's tokenizer of `model` (a .gguf file's built from its own metadata), with
    --chat-template applied."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer  # imports transformers

    path = resolve_model_path(model)
    if is_gguf_file(path):
        tok = load_gguf_tokenizer(path)
    else:
        tok = mlx_load_tokenizer(path)
    if chat_template:
        set_chat_template(tok, chat_template)
    return tok
