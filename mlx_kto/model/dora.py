"""DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353) through mlx-lm's DoRALinear:
y = m * (W + s B A) x / ||W + s B A||_row. The learned magnitude `m` rescales the base
output too, so LoRA's "scale 0 = the base" does not hold; the reference instead calls
the wrapped base layer directly (`bypass_dora`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import mlx.nn as nn
from mlx.utils import tree_unflatten


def dora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mlx_lm.tuner.dora import DoRAEmbedding, DoRALinear

    return [(p, m) for p, m in model.named_modules() if isinstance(m, (DoRALinear, DoRAEmbedding))]


@contextmanager
def bypass_dora(model: nn.Module) -> Iterator[None]:
    """Inside, every DoRA module is replaced by the base layer it wraps (the exact base
    computation); the DoRA modules are put back on exit."""
    mods = dora_modules(model)
    if not mods:
        yield
        return
    base = [(p, m.linear if hasattr(m, "linear") else m.embedding) for p, m in mods]
    model.update_modules(tree_unflatten(base))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten(mods))
