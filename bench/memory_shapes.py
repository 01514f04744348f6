"""Peak memory of one KTO training step on the real shapes of small chat models.

    .venv/bin/python bench/memory_shapes.py [--budget-s 600] [--max-gb 10] [--only qwen2.5-0.5b]

Random-init models with the real configs (hidden size, blocks, MLP width, heads, vocabulary
and tied embeddings from their Hugging Face config.json) of Qwen2.5-0.5B/1.5B and
Llama-3.2-1B/3B, in bfloat16 as mlx-lm loads them, with a bfloat16 or a 4-bit base (group 64,
as `--quantize 4`). LoRA rank 8 on every linear layer of every block, as the example configs.
Each case is one optimizer step through the trainer's own step (`step.run_step`: the policy's
no-grad KL forward, the compiled forward/backward, AdamW) on one micro-batch of `batch`
rows x `tokens` tokens (a quarter prompt, the rest completion; KL sequences as long), with the
reference log-probs answered as from a warm cache (a cold reference forward runs without
gradient and peaks below the backward pass). One JSON line per case:

    peak_gb       mx.get_peak_memory() over the step (MLX's arrays; Metal adds its own
                  overhead on a Mac: command buffers, the wired-memory residency set)
    resident_gb   weights + LoRA + AdamW state held before the step
    rss_gb        the process's peak resident set so far (this machine, CPU backend)
    estimate_gb   examples/estimate_memory.py's estimate of the same case

Cases run cheapest first (small models, 512 tokens, micro-batch 1) in their own process, so
each peak is its own; a case whose estimate exceeds --max-gb is skipped (a line says so), and
no case starts after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9

# From each model's Hugging Face config.json.
MODELS = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, num_hidden_layers=28, intermediate_size=8960,
        num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=32768,
    ),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
    ),
    "llama-3.2-3b": dict(
        model_type="llama", hidden_size=3072, num_hidden_layers=28, intermediate_size=8192,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3"),
    ),
}  # fmt: skip
PARAMS = {"qwen2.5-0.5b": 0.494e9, "qwen2.5-1.5b": 1.544e9, "llama-3.2-1b": 1.236e9}
PARAMS["llama-3.2-3b"] = 3.213e9


def cases():
    """(model, bits, grad_checkpoint, batch, tokens), cheapest first."""
    out = []
    for tokens in (512, 2048):
        for name in ("qwen2.5-0.5b", "llama-3.2-1b", "qwen2.5-1.5b", "llama-3.2-3b"):
            for batch in (1, 4):
                for bits in (4, None):
                    for gc in (True, False):
                        out.append((name, bits, gc, batch, tokens))
    cost = {n: PARAMS[n] for n in MODELS}
    return sorted(out, key=lambda c: (c[4] * c[3] * cost[c[0]], c[1] is None, c[2]))


def estimate_gb(name, bits, gc, batch, tokens) -> float:
    sys.path.insert(0, str(ROOT / "examples"))
    from estimate_memory import estimate, shape_from_dict

    return estimate(shape_from_dict(MODELS[name]), batch, tokens, -1, gc, bits)["total"]


def measure(name, bits, gc, batch, tokens, blocks=None, dtype="float32") -> dict:
    """One training step of one case (in this process); `blocks` keeps only the first N
    blocks of the model (real widths and vocabulary)."""
    import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
    from mlx_kto.config.core import KTOConfig
    from mlx_kto.data.batches import make_batch
    from mlx_kto.data.tokenize import Row, assign_kl_partners
    from mlx_kto.model.load import apply_lora
    from mlx_kto.train.distributed import Dist
    from mlx_kto.train.loop import checkpoint_paths, fast_paths, make_step_fns
    from mlx_kto.train.step import StepData, run_step

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    conf = dict(MODELS[name], num_hidden_layers=blocks or MODELS[name]["num_hidden_layers"])
    model_cls, args_cls = _get_classes(conf)
    model = model_cls(args_cls.from_dict(conf))
    model.set_dtype(getattr(mx, dtype))
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    mx.eval(model.parameters())
    cfg = KTOConfig(
        model=name, batch_size=batch, max_length=tokens, lora_rank=8, lora_alpha=16.0,
        grad_checkpoint=gc, learning_rate=1e-5, seed=0,
        grad_accumulation_steps=2 if batch == 1 else 1,  # 'kto' needs 2 rows a step
    ).validate()  # fmt: skip
    apply_lora(model, cfg)
    if gc:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    opt = optim.AdamW(learning_rate=1e-5)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    resident = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    resident += sum(v.nbytes for _, v in tree_flatten(opt.state))

    import random

    rng = random.Random(0)
    vocab = MODELS[name]["vocab_size"]
    n_prompt = tokens // 4
    rows = []
    for i in range(max(batch, 2)):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(n_prompt - 1)]
        completion = [rng.randrange(3, vocab) for _ in range(tokens - n_prompt)]
        rows.append(Row(prompt, completion, label=i % 2 == 0))
    assign_kl_partners(rows, seed=0, max_length=tokens)
    index = list(range(batch))
    data = StepData(0, 0, [[index]], [make_batch(rows, index, 16, 0, True)])

    def warm_scorer(b):  # the reference as a warm cache answers it: no forward
        return mx.zeros(b.tokens.shape[0]), mx.zeros(b.tokens.shape[0])

    model.train()
    fns = make_step_fns(model, opt, cfg, 1.0)
    mx.clear_cache()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    with fast_paths(model, **checkpoint_paths(cfg)):  # as train_loop runs it
        run_step(data, warm_scorer, fns, model, opt, cfg, Dist(), True)
    dt = time.perf_counter() - t0
    peak = mx.get_peak_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "bench": "memory_shapes",
        "model": name,
        "base": f"{bits}-bit" if bits else dtype,
        "dtype": dtype,
        "blocks": conf["num_hidden_layers"],
        "model_blocks": MODELS[name]["num_hidden_layers"],
        "grad_checkpoint": gc,
        "batch": batch,
        "tokens": tokens,
        "peak_gb": round(peak / GB, 3),
        "resident_gb": round(resident / GB, 3),
        "rss_gb": round(rss / GB, 3),
        "estimate_gb_full_bf16": round(estimate_gb(name, bits, gc, batch, tokens), 2),
        "step_s": round(dt, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=600, help="start no case after this")
    ap.add_argument("--max-gb", type=float, default=10, help="skip cases estimated above")
    ap.add_argument("--max-step-s", type=float, default=240, help="skip cases predicted slower")
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--with-4bit", action="store_true", help="--blocks-sweep: 4-bit bases too")
    ap.add_argument("--batch", type=int, default=1, help="--blocks-sweep: micro-batch rows")
    ap.add_argument("--tokens", type=int, default=512, help="--blocks-sweep: tokens per row")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, this process
    ap.add_argument(
        "--blocks-sweep",
        action="store_true",
        help="float32, 1 and 2 blocks per case, extrapolated to the full depth (a slow CPU)",
    )
    args = ap.parse_args()
    if args.case:
        print(json.dumps(measure(*json.loads(args.case))), flush=True)
        return
    if args.blocks_sweep:
        return blocks_sweep(args)
    only = set(args.only.split(",")) if args.only else None
    t_start = time.monotonic()
    rate = None  # seconds per (parameter x token), from the cases run so far
    for case in cases():
        name, bits, gc, batch, tokens = case
        if only and name not in only:
            continue
        skip = None
        est = estimate_gb(*case)
        work = PARAMS[name] * batch * tokens
        if est > args.max_gb:
            skip = f"estimate {est:.1f} GB > --max-gb {args.max_gb:g}"
        elif time.monotonic() - t_start > args.budget_s:
            skip = f"time budget of {args.budget_s:g}s spent"
        elif rate is not None and rate * work > args.max_step_s:
            skip = f"predicted step {rate * work:.0f}s > --max-step-s {args.max_step_s:g}"
        if skip:
            row = dict(zip(("model", "bits", "grad_checkpoint", "batch", "tokens"), case))
            print(json.dumps({"bench": "memory_shapes", **row, "skipped": skip}), flush=True)
            continue
        p = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(list(case))],
            capture_output=True, text=True,
        )  # fmt: skip
        if p.returncode != 0:
            err = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(json.dumps({"bench": "memory_shapes", "case": case, "error": err}), flush=True)
            continue
        line = p.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        step_s = json.loads(line)["step_s"]
        rate = max(rate or 0.0, step_s / work)


def _run_case(case) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--case", json.dumps(list(case))],
        capture_output=True, text=True,
    )  # fmt: skip
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"bench": "memory_shapes", "case": case, "error": err}
    return json.loads(p.stdout.strip().splitlines()[-1])


def blocks_sweep(args) -> None:
    """Where a full-depth step is too slow: the same step with the first 1 and 2 blocks
    (float32 compute, real widths and vocabulary), then the full depth by the line through
    them, peak(L) = peak(1) + (L - 1) x (peak(2) - peak(1)): every block holds the same
    weights and activations, and what is not per block (embeddings, LM head chunks, the
    micro-batch) is in peak(1)."""
    only = args.only.split(",") if args.only else ["qwen2.5-0.5b", "llama-3.2-1b"]
    t_start = time.monotonic()
    for name in only:
        for bits in (None, 4) if args.with_4bit else (None,):
            for gc in (False, True):
                if time.monotonic() - t_start > args.budget_s:
                    print(json.dumps({"model": name, "skipped": "time budget spent"}))
                    continue
                case = (name, bits, gc, args.batch, args.tokens)
                r = [_run_case((*case, n, "float32")) for n in (1, 2)]
                for x in r:
                    print(json.dumps(x), flush=True)
                if any("error" in x for x in r):
                    continue
                full = MODELS[name]["num_hidden_layers"]
                per_block = r[1]["peak_gb"] - r[0]["peak_gb"]
                out = {
                    "bench": "memory_shapes",
                    "what": "extrapolated",
                    "model": name,
                    "base": r[0]["base"],
                    "grad_checkpoint": gc,
                    "batch": args.batch,
                    "tokens": args.tokens,
                    "dtype": "float32",
                    "per_block_gb": round(per_block, 4),
                    "peak_gb_full_depth": round(r[0]["peak_gb"] + (full - 1) * per_block, 3),
                    "estimate_gb_full_bf16": r[0]["estimate_gb_full_bf16"],
                }
                print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
