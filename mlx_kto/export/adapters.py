"""mlx-lm adapter folders: read and check one, write one.

The folder is what mlx-lm's `load_adapters` reads and what our trainer writes:
`adapters.safetensors` with `<module path>.lora_a` [in, r], `.lora_b` [r, out] (and `.m`
[out] for DoRA), plus `adapter_config.json` with `fine_tune_type`, `num_layers` (LoRA on
the last `num_layers` blocks) and `lora_parameters: {rank, scale, dropout, keys}`. The
LoRA forward is `y = W x + scale * (x @ lora_a) @ lora_b`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import atomic_write, atomic_write_json, read_json_object

import mlx.core as mx

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

# "model.layers.3.self_attn.q_proj" -> ("model.layers", 3, "self_attn.q_proj"); the first
# numbered segment is the block index (mlx-lm keys are block-relative paths).
_BLOCK_RE = re.compile(r"^(?P<prefix>.*?)\.(?P<idx>\d+)\.(?P<rel>.+)$")


def split_block_path(path: str) -> tuple[int, str] | None:
    """(block index, block-relative path) of a module inside `...layers.N.`, else None."""
    m = _BLOCK_RE.match(path)
    return (int(m["idx"]), m["rel"]) if m else None


def block_prefix(path: str) -> str | None:
    """The block list's path ("model.layers") of a module inside one, else None."""
    m = _BLOCK_RE.match(path)
    return m["prefix"] if m else None


def module_sort_key(path: str):
    """Block modules by (index, relative path), then top-level modules by name."""
    blk = split_block_path(path)
    return (0, blk[0], blk[1]) if blk else (1, 0, path)


@dataclass
class LoraModule:
    """One LoRA'd Linear, in mlx-lm orientation."""

    path: str  # module path in the model, e.g. "model.layers.3.self_attn.q_proj"
    a: mx.array  # lora_a [in, r]
    b: mx.array  # lora_b [r, out]
    m: mx.array | None = None  # DoRA magnitude [out]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the base weight this module adapts."""
        return int(self.b.shape[1]), int(self.a.shape[0])


@dataclass
class MlxAdapter:
    """An mlx-lm LoRA/DoRA adapter in memory."""

    fine_tune_type: str  # "lora" | "dora"
    num_layers: int  # LoRA on the last num_layers blocks (-1: all)
    rank: int
    scale: float
    dropout: float = 0.0
    keys: list[str] | None = None  # block-relative (or top-level) module paths; None: all linears
    model: str | None = None  # base model path or hub id
    modules: dict[str, LoraModule] = field(default_factory=dict)

    def tensors(self) -> dict[str, mx.array]:
        """The adapters.safetensors dict."""
        out = {}
        for p, mod in self.modules.items():
            out[f"{p}.lora_a"] = mod.a
            out[f"{p}.lora_b"] = mod.b
            if mod.m is not None:
                out[f"{p}.m"] = mod.m
        return out

    def config(self) -> dict:
        """adapter_config.json as mlx-lm's load_adapters reads it."""
        params = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys is not None:
            params["keys"] = list(self.keys)
        cfg = {
            "fine_tune_type": self.fine_tune_type,
            "num_layers": self.num_layers,
            "lora_parameters": params,
        }
        if self.model is not None:
            cfg["model"] = self.model
        return cfg


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def read_config(adapter_dir: Path) -> dict:
    conf = adapter_dir / CONFIG_FILE
    if not conf.is_file():
        raise UserError(f"{adapter_dir}: no {CONFIG_FILE} (not an mlx-lm adapter folder)")
    return read_json_object(conf)


def read_adapter(adapter_dir: str | Path) -> MlxAdapter:
    """Read an mlx-lm adapter folder, checking config fields, tensor names, pairs and shapes."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UserError(f"{adapter_dir}: adapter folder not found")
    cfg = read_config(adapter_dir)
    conf = adapter_dir / CONFIG_FILE

    ftype = cfg.get("fine_tune_type", "lora")
    if ftype == "full":
        raise UserError(
            f"{conf}: fine_tune_type 'full' holds whole weights, not LoRA; use that folder as a model"
        )
    if ftype not in ("lora", "dora"):
        raise UserError(f"{conf}: fine_tune_type '{ftype}' is not 'lora' or 'dora'")
    num_layers = cfg.get("num_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool):
        raise UserError(f"{conf}: num_layers must be an integer, got {num_layers!r}")
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        raise UserError(f"{conf}: missing the lora_parameters object")
    rank = lp.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UserError(f"{conf}: lora_parameters.rank must be a positive integer, got {rank!r}")
    if "scale" not in lp:
        hint = " (mlx-lm uses scale = alpha / rank, not alpha)" if "alpha" in lp else ""
        raise UserError(f"{conf}: lora_parameters.scale is missing{hint}")
    scale = lp["scale"]
    if not _is_number(scale):
        raise UserError(f"{conf}: lora_parameters.scale must be a number, got {scale!r}")
    dropout = lp.get("dropout", 0.0)
    if not _is_number(dropout):
        raise UserError(f"{conf}: lora_parameters.dropout must be a number, got {dropout!r}")
    keys = lp.get("keys")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise UserError(f"{conf}: lora_parameters.keys must be a list of module paths")
    model = cfg.get("model")

    wfile = adapter_dir / ADAPTER_FILE
    if not wfile.is_file():
        raise UserError(f"{adapter_dir}: no {ADAPTER_FILE}")
    try:
        weights = mx.load(str(wfile))
    except Exception as e:  # mlx raises RuntimeError/ValueError on a bad file
        raise UserError(f"{wfile}: cannot read safetensors ({e})") from None

    leaves: dict[str, dict[str, mx.array]] = {}
    for name, w in weights.items():
        path, _, leaf = name.rpartition(".")
        if leaf not in ("lora_a", "lora_b", "m") or not path:
            raise UserError(f"{wfile}: tensor '{name}' is not a LoRA leaf (lora_a, lora_b, m)")
        if leaf == "m" and ftype != "dora":
            raise UserError(
                f"{wfile}: tensor '{name}' is a DoRA magnitude but fine_tune_type is '{ftype}'"
            )
        leaves.setdefault(path, {})[leaf] = w

    modules = {}
    for path in sorted(leaves, key=module_sort_key):
        d = leaves[path]
        for need in ("lora_a", "lora_b") + (("m",) if ftype == "dora" else ()):
            if need not in d:
                raise UserError(f"{wfile}: '{path}' has no {need}")
        a, b, m = d["lora_a"], d["lora_b"], d.get("m")
        if a.ndim != 2 or b.ndim != 2:
            raise UserError(
                f"{wfile}: '{path}' lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} are not 2-D "
                "(MoE expert LoRA is not supported by the converters)"
            )
        if a.shape[1] != rank or b.shape[0] != rank:
            raise UserError(
                f"{wfile}: '{path}' lora_a {tuple(a.shape)} / lora_b {tuple(b.shape)} do not "
                f"have rank {rank} (expected [in, {rank}] and [{rank}, out])"
            )
        if m is not None and tuple(m.shape) != (b.shape[1],):
            raise UserError(
                f"{wfile}: '{path}.m' has shape {tuple(m.shape)}, expected ({b.shape[1]},)"
            )
        modules[path] = LoraModule(path, a, b, m)
    if not modules:
        raise UserError(f"{wfile}: no LoRA tensors")

    return MlxAdapter(
        fine_tune_type=ftype,
        num_layers=num_layers,
        rank=rank,
        scale=float(scale),
        dropout=float(dropout),
        keys=list(keys) if keys is not None else None,
        model=model if isinstance(model, str) else None,
        modules=modules,
    )


def write_adapter(adapter: MlxAdapter, out_dir: Path) -> None:
    """Write adapters.safetensors + adapter_config.json into an existing folder (atomically)."""
    tensors = {k: mx.contiguous(v) for k, v in adapter.tensors().items()}
    atomic_write(
        out_dir / ADAPTER_FILE,
        lambda p: mx.save_safetensors(str(p), tensors),
        suffix=".safetensors",
    )
    atomic_write_json(out_dir / CONFIG_FILE, adapter.config())
