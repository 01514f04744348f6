"""Random, non-zero mlx-lm adapters for checking converters (tests and the interop suite).

A fresh LoRA has lora_b = 0, an exact no-op that would let a wrong conversion pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten


def make_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    num_layers: int = 2,
    rank: int = 4,
    scale: float = 2.0,
    keys: list[str] | None = None,
    dora: bool = False,
    seed: int = 0,
    b_std: float = 0.05,
    dtype: mx.Dtype = mx.float32,
):
    """Write an adapter folder with random lora_a/lora_b (and perturbed DoRA `m`) for the
    model at `base_dir`. Returns (out_dir, model with the adapter applied, in eval mode)."""
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = load(str(base_dir))
    model.freeze()
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    if keys is not None:
        params["keys"] = list(keys)
    mx.random.seed(seed)
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    new = []
    for i, (k, v) in enumerate(sorted(tree_flatten(model.trainable_parameters()))):
        key = mx.random.key(seed * 7919 + i)
        if k.endswith(".lora_b"):
            v = b_std * mx.random.normal(v.shape, key=key)
        elif k.endswith(".m"):
            v = v * (1.0 + 0.1 * mx.random.normal(v.shape, key=key))
        new.append((k, v.astype(dtype)))
    model.load_weights(new, strict=False)
    model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(new))
    config = {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "model": str(base_dir),
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out, model


def logits(model, tokens: list[int]):
    """Float32 numpy logits [T, V] of one sequence."""
    import numpy as np

    out = model(mx.array([tokens]))
    return np.array(out[0].astype(mx.float32))
