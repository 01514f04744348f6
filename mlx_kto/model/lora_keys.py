"""`--lora-keys`: block-relative module paths (mlx-lm: `self_attn.q_proj`) or PEFT's
short names (`q_proj`, as in `target_modules`), expanded against the model's blocks."""

from __future__ import annotations

import difflib

from mlx_kto.errors import UserError

import mlx.nn as nn


def adaptable_paths(model: nn.Module) -> list[str]:
    """Block-relative paths of the modules LoRA can wrap, over all of the model's blocks."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    kinds += (nn.Embedding, nn.QuantizedEmbedding)
    paths: set[str] = set()
    for block in model.layers:
        for p, m in block.named_modules():
            if p and (hasattr(m, "to_lora") or isinstance(m, kinds)):
                paths.add(p)
    return sorted(paths)


def expand_lora_keys(model: nn.Module, keys: list[str] | None) -> list[str] | None:
    """Full block-relative paths for `keys`: a path is kept as is, a short name (no dot)
    becomes every path ending in `.name` (PEFT's suffix match). Unknown keys raise
    UserError with the closest valid names."""
    if not keys:
        return keys
    paths = adaptable_paths(model)
    top = {name for name, _ in model.named_modules()}
    out: list[str] = []
    for key in keys:
        if key in paths:
            hits = [key]
        else:
            hits = [p for p in paths if p.endswith("." + key)]
        if not hits and (key in top or key.split(".")[-1] == "lm_head"):
            out.append(key)  # a model-level module: model.check_lora_keys judges it (tied?)
            continue
        if not hits:
            close = difflib.get_close_matches(
                key, paths + sorted({p.split(".")[-1] for p in paths}), n=2
            )
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            raise UserError(
                f"--lora-keys (lora_keys): '{key}' matches no linear layer of the model's blocks{hint}; "
                f"they are: {', '.join(paths)}"
            )
        out += [h for h in hits if h not in out]
    return out
