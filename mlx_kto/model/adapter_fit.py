"""Does an adapter fit this base? One line when it does not.

An mlx-lm adapter holds LoRA tensors for one base model's modules and shapes. Put on
another base, mlx-lm's `load_adapters` raises a ValueError listing every tensor (30 lines
for a small model); the user needs one line: which base the adapter was trained on (the
`model` its adapter_config.json records), what this base is, and how many tensors differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.errors import UserError

import mlx.nn as nn


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter folder records (adapter_config.json `model`), if any."""
    try:
        conf = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = conf.get("model") if isinstance(conf, dict) else None
    return model if isinstance(model, str) and model else None


def describe_model(model: nn.Module) -> str:
    """`llama, 2 layers, hidden size 64` from the model's args (what tells bases apart)."""
    args = getattr(model, "args", None)
    parts = [
        str(getattr(args, "model_type", "") or ""),
        f"{n} layers" if (n := getattr(args, "num_hidden_layers", None)) else "",
        f"hidden size {h}" if (h := getattr(args, "hidden_size", None)) else "",
    ]
    return ", ".join(p for p in parts if p) or type(model).__name__


def mismatch_error(
    what: str, adapter_dir: str | Path, model: nn.Module, err: Exception, base: str | None = None
) -> UserError:
    """The one line for an adapter that mlx-lm refused to put on `model` (named `base`)."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    bad = [x for x in lines[1:] if ":" in x]  # mlx-lm: "  name: why" per tensor
    trained_on = adapter_base(adapter_dir)
    this = f"{base} ({describe_model(model)})" if base else describe_model(model)
    first = lines[0] if lines else type(err).__name__
    detail = f"{len(bad)} adapter tensors do not fit, e.g. {bad[0]}" if bad else first
    origin = f"trained on {trained_on}" if trained_on else "its base is not recorded"
    return UserError(
        f"{what}: {adapter_dir} does not fit this base: {origin}, this base is {this}; {detail}"
    )


def apply_adapter(
    model: nn.Module, adapter_dir: str | Path, what: str = "--adapter-path", base: str | None = None
) -> nn.Module:
    """mlx-lm's `load_adapters` (LoRA layers inserted, weights loaded), its refusals as
    one line naming both bases."""
    from mlx_lm.tuner.utils import load_adapters  # imports transformers: seconds of startup

    try:
        return load_adapters(model, str(adapter_dir))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise mismatch_error(what, adapter_dir, model, e, base) from None
