"""Log-probs of packed sequences (data/packing.py): attention inside each sequence only,
RoPE at each token's own position, per-sequence sums of the completion targets.

mlx-lm's attention layers take their positions and mask from the KV cache they are given:

    queries = self.rope(queries, offset=cache.offset); keys = self.rope(keys, offset=...)
    keys, values = cache.update_and_fetch(keys, values)
    output = scaled_dot_product_attention(queries, keys, values, cache=cache, mask=mask)

so a stateless `SegmentCache` whose `offset` is the [R, T] position array runs an unmodified
model on packed rows; the module's `scaled_dot_product_attention` (wrapped, `windowed_sdpa`)
sees the cache's pack windows and attends per window under

    keep[w, i, j] = segment[w, i] == segment[w, j]  and  j <= i   (and i - j < window)

RoPE modules take one offset per batch row, not per token; a packed forward gives each one a
subclass (`_per_token_rope`) that, for a [B, L] offset, moves the sequence axis into the batch
axis, so every token turns by its own position with the same kernel and the same angles as in
a padded row (bit-identical, tests/test_packing.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial

from mlx_kto.model.logprobs import (
    SPLIT_MODEL_TYPES,
    _model_type,
    can_split,
    default_chunk_size,
    lm_head_logps,
    vocab_size,
)
from mlx_kto.runtime import fastops, traces
from mlx_kto.runtime.fastattn import windowed_attention
from mlx_kto.runtime.streams import row_groups, row_streams, rows_unsplit

import mlx.core as mx
import mlx.nn as nn

# Model types whose attention layers take positions and mask only through the cache (checked
# against the padded path for each: tests/test_packing.py).
PACK_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
assert PACK_MODEL_TYPES <= SPLIT_MODEL_TYPES  # the LM head runs on gathered targets only


class SegmentCache:
    """A stand-in KV cache for one packed forward: each token's position and the pack
    windows attention runs in (`windows`, see `runtime.fastattn.windowed_attention`); keys
    and values pass through (nothing is cached)."""

    def __init__(self, positions: mx.array, windows: tuple):
        self.offset = positions  # [R, T]
        self.windows = windows
        self.keys = None  # mlx-lm's pipeline code may touch it

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        """What mlx-lm passes on as the mask: None (causal inside each sequence) or the
        sliding window size; the windows' keep mask is built once (`pack_windows`)."""
        return window_size

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return keys, values


def pack_windows(pk: dict) -> tuple:
    """(slot -> flat row position [R*W*C], flat row position -> slot [R*T], keep mask
    [R*W, 1, C, C], slot positions [R*W, C]) of `Packed.arrays()`: keep[w, 0, i, j] is set
    when slots i and j hold the same sequence and j <= i (an unused slot keeps only itself)."""
    R, W, C = pk["win_idx"].shape
    T = pk["tokens"].shape[1]
    gidx = (pk["win_idx"] + (mx.arange(R) * T)[:, None, None]).reshape(-1)  # [R*W*C]
    ginv = (pk["inv"] + (mx.arange(R) * (W * C))[:, None]).reshape(-1)  # [R*T]
    seg = pk["win_seg"].reshape(R * W, C)  # [R*W, C]
    idx = mx.arange(C)
    keep = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])  # [R*W, C, C]
    pos = mx.take(pk["positions"].reshape(-1), gidx).reshape(R * W, C)  # [R*W, C]
    return gidx, ginv, keep[:, None], pos


def _mlx_attend(q, k, v, scale: float, keep: mx.array) -> mx.array:
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=keep)


def _windowed_sdpa(original: Callable) -> Callable:
    """mlx-lm's `scaled_dot_product_attention` that runs a packed forward per pack window
    (fastops' masked attention inside `fast_ops`, MLX's own attention outside)."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if getattr(cache, "windows", None) is None:
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        fast = fastops.active() and mx.default_device() == mx.cpu
        attend = fastops.masked_attention if fast else _mlx_attend
        return windowed_attention(queries, keys, values, scale, cache, mask, attend)

    scaled_dot_product_attention.windowed = True
    return scaled_dot_product_attention


def windowed_sdpa(model) -> None:
    """Let the model's module run packed forwards (for good: other caches pass through)."""
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "scaled_dot_product_attention", None)
    if fn is None or getattr(fn, "windowed", False) or hasattr(fn, "original"):
        return  # fastops' own wrapper (`original`) runs pack windows itself
    module.scaled_dot_product_attention = _windowed_sdpa(fn)


_ROPE_CLASSES: dict[type, type] = {}


def _per_token_rope(cls: type) -> type:
    """`cls` whose __call__ also takes a [B, L] array of positions as `offset`."""
    if cls not in _ROPE_CLASSES:

        def __call__(self, x, offset=0, **kwargs):
            if not (isinstance(offset, mx.array) and offset.ndim == 2):
                return cls.__call__(self, x, offset=offset, **kwargs)
            B, H, L, D = x.shape
            # [B, H, L, D] -> [B*L, H, 1, D]: one "row" per token, each with its own offset
            # (a view when x is mlx-lm's transposed [B, L, H, D] projection)
            xt = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)
            y = cls.__call__(self, xt, offset=offset.reshape(-1), **kwargs)
            return y.reshape(B, L, H, D).transpose(0, 2, 1, 3)

        _ROPE_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _ROPE_CLASSES[cls]


def _rope_modules(model) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if "rope" in type(m).__name__.lower()]


def can_pack(model) -> bool:
    """True when `packed_sequence_logps` supports `model` (PACK_MODEL_TYPES, a split LM head
    and RoPE modules that take an offset array: mlx-lm's plain, Llama 3, SuScaled, Yarn)."""
    if _model_type(model) not in PACK_MODEL_TYPES or not can_split(model):
        return False
    names = {"RoPE", "Llama3RoPE", "SuScaledRoPE", "YarnRoPE"}
    return all(type(m).__name__ in names for m in _rope_modules(model))


def per_token_rope(model) -> None:
    """Let the model's RoPE modules accept [B, L] position arrays (for good: the subclass
    behaves as its class for any other offset, and a backward that recomputes the forward,
    e.g. gradient checkpointing, runs after the packed call has returned)."""
    for m in _rope_modules(model):
        if type(m) not in _ROPE_CLASSES.values():
            m.__class__ = _per_token_rope(type(m))


def packed_hidden_states(model, pk: dict) -> mx.array:
    """Final hidden states [R, T, H] of packed rows (`model.model` with a SegmentCache per
    layer)."""
    per_token_rope(model)
    windowed_sdpa(model)
    cache = SegmentCache(pk["positions"], pack_windows(pk))
    return model.model(pk["tokens"], cache=[cache] * len(model.model.layers))


def _packed_logps(model, pk: dict, n_rows: int, chunk_size, for_grad: bool) -> mx.array:
    h = packed_hidden_states(model, pk)  # [R, T, H]
    h = mx.take_along_axis(h, pk["tgt_pos"][..., None], axis=1)  # [R, M, H]
    logps = lm_head_logps(model, h, pk["tgt_ids"], chunk_size, for_grad)  # [R, M]
    row = pk["tgt_row"]  # [R, M], -1 = unused slot
    logps = mx.where(row >= 0, logps, 0.0)  # an unused slot is 0 even if its logit is not
    onehot = row[..., None] == mx.arange(n_rows)  # [R, M, n_rows]
    return mx.where(onehot, logps[..., None], 0.0).sum(axis=(0, 1))  # [n_rows]


def packed_sequence_logps(
    model,
    pk: dict | list[dict],
    n_rows: int,
    chunk_size: int | None = None,
    *,
    for_grad: bool = False,
) -> mx.array:
    """Per-sequence completion log-prob sums [n_rows] float32 of packed sequences
    (`Packed.arrays()`, or a list of them: the pieces of one pass, data/packing.py
    `pack_passes`), equal to `sequence_logps` of the same sequences padded:

        seq_logp[b] = sum_{(p, m) : tgt_row[p, m] = b} log softmax(logits[p, tgt_pos[p, m]])[tgt_ids[p, m]]

    Differentiable; for_grad and chunk_size as in `sequence_logps`. Inside
    `cpu_row_parallel` the pieces (or a Packed's rows) run on the row streams, their sums
    added."""
    if isinstance(pk, dict):
        groups = row_groups(pk["tgt_ids"].shape[0])
        pieces = (
            [pk] if len(groups) < 2 else [{k: v[a:b] for k, v in pk.items()} for a, b in groups]
        )
    else:
        pieces = pk
    streams = row_streams() if mx.default_device() == mx.cpu else []
    out = None
    for k, piece in enumerate(pieces):
        R = piece["tgt_ids"].shape[0]
        chunk = chunk_size or default_chunk_size(R, vocab_size(model))
        if len(streams) > 1:
            with mx.stream(streams[k % len(streams)]):
                part = _packed_logps(model, piece, n_rows, chunk, for_grad)
        else:
            part = _packed_logps(model, piece, n_rows, chunk, for_grad)
        out = part if out is None else out + part
    return out


def compiled_packed_logps(model: nn.Module) -> Callable[[dict, int], mx.array]:
    """`fn(pk, n_rows) -> [n_rows]` (pk: a Packed's arrays or a pass's pieces):
    `packed_sequence_logps` for forward-only passes, compiled with the model's parameters as
    inputs. Each piece of a pass is its own call on its row stream, so a trace covers one
    piece's shape, not a pass's combination of shapes (fewer traces, each half the size:
    runtime/traces.py keeps the most recently used). As with `compiled_sequence_logps`, the
    LoRA scale and train/eval mode of the first trace are baked in: make one per mode
    (reference, KL)."""
    state = [model.state, mx.random.state]

    def make():
        @partial(mx.compile, inputs=state, outputs=[mx.random.state])
        def fn(pk, n_rows):
            return packed_sequence_logps(model, pk, n_rows)

        return fn

    fn = traces.bounded(make)

    def call(pk: dict | list[dict], n_rows: int) -> mx.array:
        if isinstance(pk, dict):
            return fn(pk, n_rows)
        streams = row_streams() if mx.default_device() == mx.cpu else []
        out = None
        with rows_unsplit():  # each piece whole on its own stream
            for k, piece in enumerate(pk):
                if len(streams) > 1:
                    with mx.stream(streams[k % len(streams)]):
                        part = fn(piece, n_rows)  # [n_rows]
                else:
                    part = fn(piece, n_rows)
                out = part if out is None else out + part
        return out

    return call
