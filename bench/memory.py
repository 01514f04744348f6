"""Peak memory of KTO training steps versus the sizes of what they must hold.

    .venv/bin/python bench/memory.py [--model PATH] [--steps 3] [--big-vocab 131072]

On the benchmark model (or --model), one JSON line each:

  budget     weights (bytes of every base parameter), LoRA weights + AdamW state (+ their
             gradients), and one micro-batch of activations: the peak, above that resident
             set, of one plain policy forward + backward on one micro-batch (what any LoRA
             trainer must hold); `limit` = 2 x their sum (the issue's bound)
  kto_step   peak of real training steps through `mlx_kto.train.loop.train_loop` with an uncached
             reference (every step runs the reference forward, the KL forward and the policy
             step: the heaviest case); `one_weight_copy`: active memory after training stays
             within weights + LoRA + optimizer state + 5%, so the reference shares the weights
  logits     for a larger vocabulary (--big-vocab, a copy of the model shape with that many
             output rows), the extra peak of `sequence_logps` over the forward's trunk versus
             the bytes of the float32 logits of the whole micro-batch: chunking over the
             sequence keeps it to a fraction
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.data.batches import make_batch  # noqa: E402
from mlx_kto.model.load import adapter_config, apply_lora, load_base  # noqa: E402
from mlx_kto.model.logprobs import hidden_states, sequence_logps  # noqa: E402
from mlx_kto.reference.scorer import ReferenceScorer  # noqa: E402
from mlx_kto.train.loop import Run, make_schedule, train_loop  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from fixture import BENCH_SHAPE, MAX_LENGTH, bench_model, bench_rows  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

LORA_KEYS = [f"self_attn.{p}_proj" for p in "qkvo"]
MB = 2**20


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


def load(model_path: Path, args) -> tuple[nn.Module, KTOConfig]:
    cfg = KTOConfig(
        model=str(model_path), batch_size=args.batch_size, max_length=MAX_LENGTH, lora_rank=8,
        lora_keys=LORA_KEYS, num_layers=-1, learning_rate=1e-5, warmup_steps=0,
        steps_per_eval=0, steps_per_save=0, keep_checkpoints=1, quiet=True,
        grad_checkpoint=args.grad_checkpoint, compile=not args.no_compile,
    ).validate()  # fmt: skip
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    return model, cfg


def budget(model_path: Path, rows, args) -> dict:
    """Weights, LoRA + optimizer state, and the activations of one policy fwd+bwd."""
    model, cfg = load(model_path, args)
    lora = model.trainable_parameters()
    weights = nbytes(model.parameters()) - nbytes(lora)
    lora_b = nbytes(lora)
    opt_state = 2 * lora_b  # AdamW: m and v, float32 like the LoRA weights
    batch = make_batch(rows, list(range(cfg.batch_size)), cfg.pad_multiple)

    def loss(model, tokens, mask):
        return sequence_logps(model, tokens, mask).sum()

    vg = nn.value_and_grad(model, loss)
    model.train()
    mx.eval(vg(model, batch.tokens, batch.mask))  # first call: allocator warm
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    out = vg(model, batch.tokens, batch.mask)
    mx.eval(out)
    acts = mx.get_peak_memory() - base  # activations + the gradients (LoRA-sized)
    del out, model
    mx.clear_cache()
    total = weights + lora_b + opt_state + lora_b + acts
    return {
        "bench": "memory",
        "what": "budget",
        "weights_mb": round(weights / MB, 1),
        "lora_mb": round(lora_b / MB, 2),
        "optimizer_state_mb": round(opt_state / MB, 2),
        "activations_one_microbatch_mb": round(acts / MB, 1),
        "tokens_shape": list(batch.tokens.shape),
        "sum_mb": round(total / MB, 1),
        "limit_mb": round(2 * total / MB, 1),
    }


def kto_step(model_path: Path, rows, args, limit_mb: float, weights_mb: float) -> dict:
    """Peak of real training steps (uncached reference: reference + KL + policy each step)."""
    model, cfg = load(model_path, args)
    n = args.steps
    optimizer = optim.AdamW(learning_rate=make_schedule(cfg, n))
    optimizer.init(model.trainable_parameters())
    scorer = ReferenceScorer(model)
    with tempfile.TemporaryDirectory(prefix="mlx_kto_mem_") as tmp:
        mx.clear_cache()
        mx.reset_peak_memory()
        a_config = adapter_config(cfg, str(model_path), len(model.layers))
        run = Run(cfg, model, optimizer, rows, scorer, Path(tmp), a_config, n, log=lambda *_: None)
        train_loop(run, progress=False)
        peak = mx.get_peak_memory()
    mx.clear_cache()
    resident = mx.get_active_memory()
    lora = nbytes(model.trainable_parameters())
    expected = weights_mb * MB + 3 * lora
    return {
        "bench": "memory",
        "what": "kto_step",
        "steps": n,
        "compile": cfg.compile,
        "grad_checkpoint": cfg.grad_checkpoint,
        "peak_mb": round(peak / MB, 1),
        "limit_mb": limit_mb,
        "peak_over_limit": round(peak / MB / limit_mb, 3),
        "under_limit": peak / MB < limit_mb,
        "peak_over_weights": round(peak / MB / weights_mb, 2),
        "active_after_mb": round(resident / MB, 1),
        "weights_plus_lora_opt_mb": round(expected / MB, 1),
        "one_weight_copy": resident <= 1.05 * expected,
    }


def logits_peak(args, tmp: Path) -> dict:
    """Extra peak of sequence_logps over the trunk forward, vs full float32 logits."""
    from toy import build_model

    path = tmp / "big-vocab"
    shape = {**BENCH_SHAPE, "vocab_size": args.big_vocab, "num_hidden_layers": 2}
    build_model(path, family="llama", seed=0, init_std=0.02, **shape)
    model, _, _, _ = load_base(KTOConfig(model=str(path)))
    rows = bench_rows(args.batch_size, vocab=args.big_vocab)
    batch = make_batch(rows, list(range(args.batch_size)), 16)
    B, T = batch.tokens.shape
    out = {}
    for name, fn in (
        ("trunk", lambda: hidden_states(model, batch.tokens[:, :-1])),
        ("sequence_logps", lambda: sequence_logps(model, batch.tokens, batch.mask)),
        ("full_logits", lambda: model(batch.tokens[:, :-1])),
    ):
        mx.eval(fn())
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(fn())
        out[name] = mx.get_peak_memory() - base
    logits_b = B * (T - 1) * args.big_vocab * 4
    return {
        "bench": "memory",
        "what": "logits",
        "vocab": args.big_vocab,
        "tokens_shape": [B, T],
        "fp32_logits_whole_batch_mb": round(logits_b / MB, 1),
        "trunk_peak_mb": round(out["trunk"] / MB, 1),
        "sequence_logps_peak_mb": round(out["sequence_logps"] / MB, 1),
        "model_call_peak_mb": round(out["full_logits"] / MB, 1),
        "head_extra_over_logits": round((out["sequence_logps"] - out["trunk"]) / logits_b, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a real model folder (default: the bench model)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="training steps measured")
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--big-vocab", type=int, default=131072, help="0 skips the logits check")
    args = ap.parse_args()

    model_path = Path(args.model) if args.model else bench_model()
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    rows = bench_rows(args.steps * args.batch_size, vocab=vocab)
    b = budget(model_path, rows, args)
    print(json.dumps(b), flush=True)
    print(json.dumps(kto_step(model_path, rows, args, b["limit_mb"], b["weights_mb"])), flush=True)
    if args.big_vocab:
        with tempfile.TemporaryDirectory(prefix="mlx_kto_mem_") as tmp:
            print(json.dumps(logits_peak(args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
