"""Rough peak-memory estimate of a KTO LoRA run, to pick settings for a Mac.

    python examples/estimate_memory.py                       # the table for the example models
    python examples/estimate_memory.py --config path/to/config.json --batch-size 4 \
        --max-length 1024 --num-layers 16 --grad-checkpoint --bits 4

The estimate is deliberately simple and errs high:

    peak ~ weights + LoRA and AdamW state + activations + logits chunk + 0.4 GB fixed

  weights      params x bits/8 (+0.5 bit/param of group scales and biases when quantized)
  activations  per token of a padded micro-batch (batch_size x max_length) and per LoRA'd
               block: (12 h + 5 i + 3 kv) x 2 bytes, h = hidden size, i = MLP size,
               kv = key/value width; with --grad-checkpoint 2 h x 2 bytes per block
               (its input, kept for the recompute) plus one block's activations.
               Blocks below the LoRA'd ones keep nothing for the backward pass.
  logits       chunked over the sequence (mlx_kto.model.logprobs): one 64 MiB float32 chunk
               plus its half-precision copy.

The reference and KL forwards run without gradient, so they add one block of
activations at a time, not a whole graph. Real runs pad each micro-batch only to
its longest row (length-bucketed), so typical use sits below the estimate. Check
a real run with the `peak_memory_gb` column of metrics.jsonl.

Calibration (mlx_kto's trainer on MLX's CPU backend, float32, so every term x2):
a random Qwen2.5-0.5B-shaped model (24 blocks, vocabulary 151936), micro-batch
2 x 512 tokens, LoRA on all blocks: measured peak 5.87 GB (estimate 6.0) without
and 2.67 GB (estimate 2.8) with gradient checkpointing; the per-block constant
also matched Llama-3.2-1B-shaped blocks (62k floats per token measured, 66k by the
formula). Real models run in bfloat16, hence the 2 bytes above. Metal may differ
somewhat from the CPU backend: treat these as planning figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9
# Shapes from the models' Hugging Face config.json files.
PRESETS = {
    "Qwen2.5-0.5B-Instruct": dict(
        h=896, layers=24, i=4864, heads=14, kv_heads=2, head_dim=64, vocab=151936, params=0.494e9
    ),
    "Qwen2.5-1.5B-Instruct": dict(
        h=1536, layers=28, i=8960, heads=12, kv_heads=2, head_dim=128, vocab=151936, params=1.544e9
    ),
    "Llama-3.2-1B-Instruct": dict(
        h=2048, layers=16, i=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256, params=1.236e9
    ),
    "Llama-3.2-3B-Instruct": dict(
        h=3072, layers=28, i=8192, heads=24, kv_heads=8, head_dim=128, vocab=128256, params=3.213e9
    ),
    "Llama-3.1-8B-Instruct": dict(
        h=4096, layers=32, i=14336, heads=32, kv_heads=8, head_dim=128, vocab=128256, params=8.030e9
    ),
}
FIXED_GB = 0.4  # runtime, tokenizer, compiled graphs, buffers


def shape_from_config(path: str | Path) -> dict:
    """The fields the estimate needs from a Hugging Face config.json."""
    return shape_from_dict(json.loads(Path(path).read_text()))


def shape_from_dict(c: dict) -> dict:
    """The fields the estimate needs from a config.json's contents."""
    h, layers, i = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim") or h // heads
    vocab = c["vocab_size"]
    per_layer = h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim + 3 * h * i
    embed = vocab * h * (1 if c.get("tie_word_embeddings", False) else 2)
    return dict(
        h=h,
        layers=layers,
        i=i,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        params=layers * per_layer + embed,
    )


def estimate(
    shape: dict,
    batch_size: int,
    max_length: int,
    num_layers: int = -1,
    grad_checkpoint: bool = False,
    bits: int | None = 4,
    lora_rank: int = 8,
) -> dict:
    """Estimated peak memory in GB (and its parts) of one training step."""
    h, i, layers = shape["h"], shape["i"], shape["layers"]
    kv = shape["kv_heads"] * shape["head_dim"]
    n_lora = layers if num_layers < 0 else min(num_layers, layers)
    tokens = batch_size * max_length
    weights = shape["params"] * ((bits + 0.5) / 8 if bits else 2)  # bf16 when not quantized
    # LoRA on the 7 linear layers of a block: r x (in + out) each; weights + grads + 2 Adam moments.
    q_out = shape["heads"] * shape["head_dim"]
    lora_params = n_lora * lora_rank * ((h + q_out) * 2 + (h + kv) * 2 + 3 * (h + i))
    lora = lora_params * 4 * 4
    per_block = tokens * (12 * h + 5 * i + 3 * kv) * 2
    if grad_checkpoint:
        acts = n_lora * tokens * 2 * h * 2 + per_block
    else:
        acts = n_lora * per_block
    logits = (1 << 24) * 4 * 1.5 + tokens * h * 2 * 2
    total = weights + lora + acts + logits + FIXED_GB * GB
    return {
        k: v / GB
        for k, v in dict(
            weights=weights, lora=lora, activations=acts, logits=logits, total=total
        ).items()
    }


# What macOS lets the GPU use by default (about 2/3 of RAM on these sizes), minus headroom.
BUDGET_GB = {8: 5.0, 16: 10.5, 32: 21.0}
# Tried in order; the first that fits the budget is recommended. Large micro-batches first
# (better KL estimate, better throughput), checkpointing before cutting layers.
CHOICES = [
    dict(batch_size=8, grad_checkpoint=False),
    dict(batch_size=4, grad_checkpoint=False),
    dict(batch_size=8, grad_checkpoint=True),
    dict(batch_size=4, grad_checkpoint=True),
    dict(batch_size=2, grad_checkpoint=True),
    dict(batch_size=2, grad_checkpoint=True, num_layers=16),
    dict(batch_size=2, grad_checkpoint=True, num_layers=8),
]


def recommend(shape: dict, ram_gb: int, max_length: int = 1024) -> dict | None:
    """The first of CHOICES whose estimate fits a `ram_gb` Mac, with its estimate."""
    for choice in CHOICES:
        est = estimate(shape, max_length=max_length, **choice)
        if est["total"] <= BUDGET_GB[ram_gb]:
            return {**choice, "estimate_gb": round(est["total"], 1)}
    return None


def describe(rec: dict | None) -> str:
    if rec is None:
        return "does not fit"
    parts = [f"batch {rec['batch_size']}"]
    layers = rec.get("num_layers", -1)
    parts.append(f"last {layers} layers" if layers > 0 else "all layers")
    if rec.get("grad_checkpoint"):
        parts.append("checkpointing")
    return f"{', '.join(parts)}: ~{rec['estimate_gb']:.1f} GB"


def table() -> list[str]:
    lines = [
        "| model (4-bit) | weights | 8 GB Mac | 16 GB Mac | 32 GB Mac |",
        "|---|---|---|---|---|",
    ]
    for name, shape in PRESETS.items():
        cells = [describe(recommend(shape, ram)) for ram in (8, 16, 32)]
        w = estimate(shape, 1, 1)["weights"]
        lines.append(f"| {name} | {w:.2f} GB | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description="Rough peak memory of a KTO LoRA step.")
    ap.add_argument("--config", help="a model's config.json (default: print the example table)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--num-layers", type=int, default=-1)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--bits", type=int, default=4, help="4 or 8; 0 for an unquantized bf16 base")
    ap.add_argument("--lora-rank", type=int, default=8)
    args = ap.parse_args()
    if not args.config:
        print("\n".join(table()))
        print("(estimates at max_length 1024, LoRA rank 8; see the docstring for the formula)")
        return
    est = estimate(
        shape_from_config(args.config),
        args.batch_size,
        args.max_length,
        args.num_layers,
        args.grad_checkpoint,
        args.bits or None,
        args.lora_rank,
    )
    print(json.dumps({k: round(v, 2) for k, v in est.items()}))


if __name__ == "__main__":
    main()
