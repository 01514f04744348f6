"""The base model an adapter is checked against: config, weight shapes, module kinds.

The structure comes from mlx-lm's own model class built from config.json. Its
parameters are lazy arrays that are never evaluated, so this costs no memory even for
a 70B config, and a quantized MLX base gives the unquantized (Hugging Face) shapes.
For the families we convert, mlx-lm's parameter names are the Hugging Face names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import read_json_object
from mlx_kto.export.adapters import MlxAdapter

import mlx.nn as nn
from mlx.utils import tree_flatten


@dataclass
class BaseModel:
    """What the converters need to know about a base checkpoint."""

    ref: str  # as the user named it (path or hub id)
    path: Path  # local folder
    config: dict  # config.json
    shapes: dict[str, tuple[int, ...]]  # parameter name -> unquantized shape
    kinds: dict[str, str]  # module path -> "linear" | "embedding" | "switch" | class name
    n_layers: int

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def quantized(self) -> bool:
        return "quantization" in self.config or "quantization_config" in self.config


def resolve_local(ref: str) -> Path | None:
    """A local folder for `ref`: the path itself, or the hub id's snapshot in the HF cache."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if p.is_absolute() or ref.startswith("."):
        return None
    try:
        from mlx_lm.utils import hf_repo_to_path

        return hf_repo_to_path(ref)
    except Exception:  # not cached / not a valid repo id: both mean "not here"
        return None


def _kind(module: nn.Module) -> str:
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, nn.Linear | nn.QuantizedLinear):
        return "linear"
    if isinstance(module, nn.Embedding | nn.QuantizedEmbedding):
        return "embedding"
    if isinstance(module, SwitchLinear | QuantizedSwitchLinear):
        return "switch"
    return type(module).__name__


def load_base(ref: str | Path, what: str = "--base") -> BaseModel:
    """Describe the base model at `ref` (folder or cached hub id) without loading weights."""
    ref = str(ref)
    if ref.lower().endswith(".gguf"):
        raise UserError(
            f"{what} '{ref}': a .gguf base is only read by to-gguf; for this command convert "
            "it first (mlx-kto convert gguf-to-mlx FILE OUT) and pass OUT"
        )
    path = resolve_local(ref)
    if path is None:
        raise UserError(
            f"{what} '{ref}': not a local folder or a model in the Hugging Face cache "
            "(download it first, e.g. with `hf download`)"
        )
    conf = path / "config.json"
    if not conf.is_file():
        raise UserError(f"{what} '{ref}': no config.json in {path}")
    config = read_json_object(conf)
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        model = model_class(args_class.from_dict(config))  # lazy: nothing is evaluated
    except Exception as e:
        raise UserError(f"{conf}: mlx-lm cannot build this model ({e})") from None
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    kinds = {name: _kind(m) for name, m in model.named_modules() if name}
    return BaseModel(
        ref=ref,
        path=path,
        config=config,
        shapes=shapes,
        kinds=kinds,
        n_layers=len(model.layers),
    )


def check_adapter(adapter: MlxAdapter, base: BaseModel, where: str = "adapter") -> None:
    """Every LoRA module must be a Linear of the base with matching [out, in]; refuse
    embeddings and MoE experts, which the converters cannot express."""
    errors = []
    for path, mod in adapter.modules.items():
        kind = base.kinds.get(path)
        if kind is None:
            errors.append(f"'{path}' is not a module of the base model")
        elif kind == "embedding":
            errors.append(f"'{path}' is an embedding: LoRA on embeddings is not supported here")
        elif kind != "linear":
            errors.append(f"'{path}' is a {kind}, not a Linear")
        else:
            w = base.shapes[f"{path}.weight"]
            if mod.shape != tuple(w):
                errors.append(
                    f"'{path}' adapts a [{mod.shape[0]}, {mod.shape[1]}] weight but the base "
                    f"weight is [{w[0]}, {w[1]}]"
                )
    if adapter.num_layers > base.n_layers:
        errors.append(f"num_layers {adapter.num_layers} > the base's {base.n_layers} blocks")
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise UserError(f"{where} does not fit base '{base.ref}': " + "; ".join(errors[:3]) + more)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size:
                raise ValueError(f"header length {n} exceeds the file size")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, OSError) as e:  # truncated, garbage, unreadable
        raise UserError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def checkpoint_names(folder: Path) -> set[str]:
    """Tensor names stored in a folder's *.safetensors files."""
    names = set()
    for f in sorted(folder.glob("*.safetensors")):
        names |= {k for k in safetensors_header(f) if k != "__metadata__"}
    return names
