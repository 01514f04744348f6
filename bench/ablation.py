"""What each optimisation of the warm KTO step buys, one added at a time, interleaved.

    .venv/bin/python bench/ablation.py [--rows 32]

Warm step = the policy's KL forward + the compiled policy forward/backward/AdamW step, with
the reference log-probs known (bench/fixture.py model and rows, micro-batch 8). Variants, each
adding one change to the previous:

  v0 baseline      trainer before issue 6: autograd through logsumexp, eager KL forward left
                   lazy and evaluated together with the step, LM head over every position
  v1 +kl_eval      the KL forward evaluated on its own before the step
  v2 +kl_compile   the KL forward compiled
  v3 +head_vjp     analytic LM-head backward keeping the softmax (for_grad=True)
  v4 +head_start   LM head and log-softmax only from the shortest prompt on
  v5 +2_streams    rows spread over one CPU stream per core, single-threaded OpenBLAS
  v6 +fast_exp     attention, SwiGLU and the LM head with fastops' arithmetic exp (x86 CPU)
  v7 +eager_step   the policy step not traced as a whole (its fastops pieces still compiled),
                   as make_train_step runs it on CPU streams

The malloc thresholds (mlx_kto.runtime.heap) are process-wide, so they are on for every variant;
MLX_KTO_MALLOC_TUNE=0 runs all of them without.

Every batch is timed once per variant, in turn, so they share the machine's load; one JSON
line per variant with its median step time and its median per-batch ratio to v0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.data.batches import iterate_batches  # noqa: E402
from mlx_kto.model import head_logps, logprobs  # noqa: E402
from mlx_kto.model.load import apply_lora, load_base  # noqa: E402
from mlx_kto.reference.scorer import ReferenceScorer  # noqa: E402
from mlx_kto.runtime import (
    fastops,  # noqa: E402
    streams,  # noqa: E402
)
from mlx_kto.train.loss import kto_loss  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from fixture import MAX_LENGTH, bench_model, bench_rows  # noqa: E402

VARIANTS = ("v0 baseline", "v1 +kl_eval", "v2 +kl_compile", "v3 +head_vjp", "v4 +head_start")
VARIANTS += ("v5 +2_streams", "v6 +fast_exp", "v7 +eager_step")
_analytic_head = head_logps.head_target_logps


def _autograd_head(module, head, h, targets, keep):
    return head_logps.target_logps(head, h, targets)


def make_variant(level: int, model, optimizer, cfg):
    state = [model.state, optimizer.state, mx.random.state]
    for_grad = level >= 3

    def loss_fn(model, tokens, mask, labels, ref, kl_pol, kl_ref, hs):
        pol = logprobs.sequence_logps(model, tokens, mask, for_grad=for_grad, head_start=hs)
        return kto_loss(pol, ref, kl_pol, kl_ref, labels)

    loss_and_grad = nn.value_and_grad(model, loss_fn)

    def step(tokens, mask, labels, ref, kl_pol, kl_ref, hs):
        (loss, metrics), grad = loss_and_grad(model, tokens, mask, labels, ref, kl_pol, kl_ref, hs)
        grad, norm = optim.clip_grad_norm(grad, cfg.max_grad_norm)
        optimizer.update(model, grad)
        return loss, metrics, norm

    if level < 7:
        step = partial(mx.compile, inputs=state, outputs=state)(step)

    @partial(mx.compile, inputs=[model.state, mx.random.state], outputs=[mx.random.state])
    def kl_compiled(tokens, mask, hs):
        return logprobs.sequence_logps(model, tokens, mask, head_start=hs)

    def run(batch, ref, kl_ref):
        head_logps.head_target_logps = _analytic_head if level >= 3 else _autograd_head
        hs = batch.head_start if level >= 4 else 0
        ctx = streams.cpu_row_parallel(2) if level >= 5 else nullcontext()
        fast = fastops.fast_ops(model, enable=True) if level >= 6 else nullcontext()
        t0 = time.perf_counter()
        with ctx, fast:
            if level >= 2:
                kl = kl_compiled(batch.kl_tokens, batch.kl_mask, hs)
            else:
                kl = logprobs.sequence_logps(model, batch.kl_tokens, batch.kl_mask, head_start=hs)
            kl = mx.stop_gradient(kl)
            if level >= 1:
                mx.eval(kl)
            out = step(batch.tokens, batch.mask, batch.labels, ref, kl, kl_ref, hs)
            mx.eval(out, model.trainable_parameters(), optimizer.state)
        dt = time.perf_counter() - t0
        head_logps.head_target_logps = _analytic_head
        return dt

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    args = ap.parse_args()
    cfg = KTOConfig(
        model=str(bench_model()), batch_size=8, max_length=MAX_LENGTH, lora_rank=8,
        lora_keys=[f"self_attn.{p}_proj" for p in "qkvo"], learning_rate=1e-5,
    ).validate()  # fmt: skip
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)
    optimizer = optim.AdamW(learning_rate=cfg.learning_rate)
    optimizer.init(model.trainable_parameters())
    rows = bench_rows(args.rows)
    batches = [b for _, _, b in iterate_batches(rows, 8, seed=0, loop=False)]
    scorer = ReferenceScorer(model)
    refs = [scorer(b) for b in batches]
    model.train()
    runs = [make_variant(i, model, optimizer, cfg) for i in range(len(VARIANTS))]
    for b, (r, rk) in zip(batches, refs, strict=True):  # warm-up: trace every shape
        for run in runs:
            run(b, r, rk)
    times = [[] for _ in runs]
    loads = []
    for b, (r, rk) in zip(batches, refs, strict=True):
        for i, run in enumerate(runs):
            times[i].append(run(b, r, rk))
        loads.append(os.getloadavg()[0])
    for name, t in zip(VARIANTS, times, strict=True):
        ratio = statistics.median(a / b for a, b in zip(t, times[0], strict=True))
        line = {"bench": "ablation", "variant": name, "median_step_s": round(statistics.median(t), 3),
                "min_step_s": round(min(t), 3), "ratio_to_v0": round(ratio, 3),
                "load_avg_1m": [round(min(loads), 2), round(max(loads), 2)]}  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
