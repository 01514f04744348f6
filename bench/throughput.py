"""Training throughput: KTO step (cold and warm reference cache) vs an mlx-lm LoRA SFT step.

    .venv/bin/python bench/throughput.py [--model PATH] [--rows 64] [--batch-size 8] [--baseline]

One process, the same rows (bench/fixture.py: ~64 prompt + ~128 completion tokens, micro-batch
8, max_length 256, LoRA rank 8 on q,k,v,o of every block), three steps per batch, interleaved
so that all three see the same machine load (the 2 cores of the dev machine are shared):

  sft       mlx-lm's compiled LoRA SFT step (`default_loss` and the `step` of
            mlx_lm.tuner.trainer.train, as there) on the batch's main sequences, padded the way
            mlx-lm pads (1 + 32k); mlx-lm's own threading (OpenBLAS on both cores)
  kto_cold  `mlx_kto.train.loop.make_train_step` (what `train_loop` runs per micro-batch) with a
            reference cache that has never seen the batch: every sequence misses, so the step
            runs the batched reference forward and stores it
  kto_warm  the same step on the same batch with a cache that holds it: no reference forward

A warm-up pass over every batch first compiles each step for each shape and fills the warm
cache; it is not timed. Then each batch is timed once per phase (plus a 2048^3 fp32 matmul
probe). One JSON line per phase: median step seconds, tokens/s (real, non-padding tokens of
the main sequences), peak memory, model FLOPs per step, MFU against the best fp32 matmul rate
measured in the run. A last line holds the per-batch median ratios the issue sets targets for
(warm/sft <= 1.7, cold/sft <= 2.8, MFU(warm) >= 0.35).

FLOPs are counted on real tokens only (padding is waste, not work): forward = 2 x (base +
LoRA matmul weights) per token + causal attention; a LoRA backward = the input gradients
(the same matmul FLOPs, attention twice) + the LoRA weight gradients. So SFT is about 2
forward-equivalents, a warm KTO step 3 (+ the KL forward), a cold one 5.

--baseline times the trainer as it was before issue 6 (autograd through logsumexp, the eager
KL forward evaluated together with the step, LM head over every position, one CPU stream,
MLX's exp, glibc's default malloc) for before/after figures. The reference scorer is today's
in both. The SFT step runs in the same process, so it shares the malloc setting (its ceiling
is the faster for it: the ratios are conservative).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if "--baseline" in sys.argv:  # glibc's own (dynamic) malloc thresholds: never tuned
    os.environ["MLX_KTO_MALLOC_TUNE"] = "0"

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.data.batches import iterate_batches  # noqa: E402
from mlx_kto.model import head_logps, logprobs  # noqa: E402
from mlx_kto.model.load import apply_lora, load_base  # noqa: E402
from mlx_kto.reference.fingerprint import reference_fingerprint  # noqa: E402
from mlx_kto.reference.scorer import RefCache, ReferenceScorer  # noqa: E402
from mlx_kto.runtime import fastops  # noqa: E402
from mlx_kto.runtime import streams as rs  # noqa: E402
from mlx_kto.train import loop as trainer
from mlx_kto.train.loss import kto_loss, metrics_to_floats  # noqa: E402
from mlx_kto.train.stepfns import loss_kwargs  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from fixture import MAX_LENGTH, bench_model, bench_rows  # noqa: E402
from mlx.utils import tree_flatten, tree_map  # noqa: E402

LORA_KEYS = [f"self_attn.{p}_proj" for p in "qkvo"]
PHASES = ("sft", "kto_cold", "kto_warm")


def machine() -> dict:
    return {
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "mlx": mx.__version__,
        "blas": getattr(mlx_kto.runtime.blas, "loaded", None),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def matmul_rate(n: int = 2048, reps: int = 3) -> float:
    """Best-of-reps fp32 GEMM rate in FLOP/s (the MFU denominator), OpenBLAS on all cores."""
    a = mx.random.normal((n, n))  # [n, n]
    b = mx.random.normal((n, n))  # [n, n]
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


# -- model FLOPs ------------------------------------------------------------------------------


def _linear_dims(m: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a (possibly quantized) linear layer."""
    if isinstance(m, nn.QuantizedLinear):
        out, packed = m.weight.shape
        return packed * 32 // m.bits, out
    if isinstance(m, nn.Linear):
        out, inp = m.weight.shape
        return inp, out
    return None


class FlopModel:
    """Model FLOPs of forward / LoRA-backward passes over sequences of given lengths."""

    def __init__(self, model: nn.Module):
        base = lora = 0
        for _, m in model.named_modules():
            dims = _linear_dims(m)
            if dims is not None:
                base += dims[0] * dims[1]
            if hasattr(m, "lora_a"):
                lora += m.lora_a.size + m.lora_b.size
        if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
            emb = model.model.embed_tokens
            width = emb.weight.shape[1] * (32 // emb.bits if hasattr(emb, "bits") else 1)
            base += emb.weight.shape[0] * width  # the tied head as a matmul
        args = model.args
        heads = args.num_attention_heads
        head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
        self.base, self.lora = base, lora
        self.attn_width = len(model.layers) * heads * head_dim  # per token, all layers

    def _attn(self, L: int) -> float:
        # QK^T and PV over a causal context: 2 matmuls x 2 FLOPs x (L+1)/2 keys on average.
        return 2 * 2 * (L + 1) / 2 * self.attn_width

    def forward(self, lengths) -> float:
        return sum(L * (2 * (self.base + self.lora) + self._attn(L)) for L in lengths)

    def backward(self, lengths) -> float:
        # Input gradients through every matmul + the LoRA weight gradients; frozen base
        # weights get no gradient. Attention backward: 4 matmuls vs 2 forward.
        return sum(L * (2 * self.base + 4 * self.lora + 2 * self._attn(L)) for L in lengths)


def step_flops(fm: FlopModel, rows, index, phase: str) -> float:
    main = [len(rows[i].tokens) for i in index]
    kl = [len(rows[i].kl_tokens) for i in index]
    f = fm.forward(main) + fm.backward(main)
    if phase.startswith("kto"):
        f += fm.forward(kl)  # the policy's KL forward (no gradient)
    if phase == "kto_cold":
        f += fm.forward(main) + fm.forward(kl)  # reference forwards
    return f


# -- the steps ----------------------------------------------------------------------------------


def use_baseline() -> None:
    """The log-prob head as before issue 6 (autograd through logsumexp), one CPU stream,
    MLX's own exp, glibc's default malloc thresholds."""
    head_logps.head_target_logps = lambda module, head, h, t, keep: head_logps.target_logps(
        head, h, t
    )
    os.environ["MLX_KTO_CPU_STREAMS"] = "1"
    os.environ["MLX_KTO_FAST_EXP"] = "0"


def baseline_train_step(model, optimizer, cfg):
    """`train_loop`'s per-micro-batch work as before issue 6 (commit e9b3326): eager KL
    forward over every position, left lazy and evaluated together with the compiled step."""
    loss_kw = loss_kwargs(cfg, 1.0)

    def loss_fn(model, tokens, mask, labels, ref, kl_pol, kl_ref):
        pol = logprobs.sequence_logps(model, tokens, mask)
        return kto_loss(pol, ref, kl_pol, kl_ref, labels, **loss_kw)

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    cstate = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=cstate, outputs=cstate)
    def step(tokens, mask, labels, ref, kl_pol, kl_ref):
        (loss, metrics), grad = loss_and_grad(model, tokens, mask, labels, ref, kl_pol, kl_ref)
        grad, norm = optim.clip_grad_norm(grad, cfg.max_grad_norm)
        optimizer.update(model, grad)
        return loss, metrics, None, norm

    def train_step(batch, scorer, prev_grad, do_update):
        ref, ref_kl = scorer(batch)
        kl_pol = mx.stop_gradient(logprobs.sequence_logps(model, batch.kl_tokens, batch.kl_mask))
        return step(batch.tokens, batch.mask, batch.labels, ref, kl_pol, ref_kl)

    return train_step


def kto_runner(model_path: Path, args, tmp: Path, max_length: int = MAX_LENGTH):
    """(run(batch, phase) -> seconds, extra bytes resident for the other model, scorers)."""
    cfg = KTOConfig(
        model=str(model_path), batch_size=args.batch_size, max_length=max_length,
        lora_rank=8, lora_keys=LORA_KEYS, num_layers=-1, learning_rate=1e-5, warmup_steps=0,
        quiet=True, seed=args.seed, grad_checkpoint=args.grad_checkpoint,
    ).validate()  # fmt: skip
    model, _, path, _ = load_base(cfg)
    apply_lora(model, cfg)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    optimizer = optim.AdamW(learning_rate=cfg.learning_rate)
    optimizer.init(model.trainable_parameters())
    if args.baseline:
        step = baseline_train_step(model, optimizer, cfg)
    else:
        step = trainer.make_train_step(model, optimizer, cfg, 1.0)
    scorers = {}
    for phase in ("kto_cold", "kto_warm"):
        cache = RefCache(tmp / phase)
        fp = reference_fingerprint(path, memo=cache)
        scorers[phase] = ReferenceScorer(model, cache=cache, fingerprint=fp)
    model.train()

    def run(batch, phase: str) -> float:
        t0 = time.perf_counter()
        with trainer.fast_paths(model):  # what train_loop does around its steps
            loss, metrics, grad, norm = step(batch, scorers[phase], None, True)
            mx.eval(loss, metrics, grad, norm, model.trainable_parameters(), optimizer.state)
            metrics_to_floats(metrics)
        return time.perf_counter() - t0

    resident = nbytes(model.parameters()) + nbytes(optimizer.state)
    return run, resident, scorers


def sft_batch(rows, index):
    """mlx-lm's padding (tuner/trainer.py iterate_batches): 1 + multiple of 32; lengths are
    (completion offset, length) so default_loss scores the completion tokens."""
    seqs = [rows[i].tokens for i in index]
    T = 1 + 32 * ((max(len(s) for s in seqs) + 31) // 32)
    arr = np.zeros((len(seqs), T), np.int32)  # [B, T]
    for j, s in enumerate(seqs):
        arr[j, : len(s)] = s
    lengths = [(len(rows[i].prompt_ids), len(rows[i].tokens)) for i in index]
    return mx.array(arr), mx.array(lengths)


def sft_runner(model_path: Path, args):
    from mlx_lm.tuner.trainer import default_loss, grad_checkpoint

    cfg = KTOConfig(model=str(model_path), lora_rank=8, lora_keys=LORA_KEYS, seed=args.seed)
    model, _, _, _ = load_base(cfg)
    apply_lora(model, cfg)  # mlx-lm's linear_to_lora_layers, same rank / scale / keys
    if args.grad_checkpoint:
        grad_checkpoint(model.layers[0])
    optimizer = optim.AdamW(learning_rate=1e-5)
    loss_value_and_grad = nn.value_and_grad(model, default_loss)
    state = [model.state, optimizer.state, mx.random.state]

    # mlx_lm.tuner.trainer.train's step, as it is there (grad accumulation of 1).
    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (lvalue, toks), grad = loss_value_and_grad(model, *batch)
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            optimizer.update(model, grad)
            grad = None
        return lvalue, toks, grad

    model.train()

    def run(sft_b) -> float:
        t0 = time.perf_counter()
        lvalue, toks, _ = step(sft_b, None, True)
        mx.eval(lvalue, toks, state)  # mlx-lm's loop evaluates the same
        return time.perf_counter() - t0

    return run, nbytes(model.parameters()) + nbytes(optimizer.state)


# -- reporting --------------------------------------------------------------------------------------


def summarize(phase, times, ntoks, flops, peak, rate) -> dict:
    achieved = sum(flops) / sum(times)
    return {
        "bench": "throughput",
        "phase": phase,
        "steps": len(times),
        "median_step_s": round(statistics.median(times), 4),
        "min_step_s": round(min(times), 4),
        "tokens_per_s": round(sum(ntoks) / sum(times), 1),
        "peak_memory_mb": round(peak / 2**20, 1),
        "gflop_per_step": round(statistics.mean(flops) / 1e9, 2),
        "achieved_gflops": round(achieved / 1e9, 2),
        "mfu": round(achieved / rate, 3),
    }


def measure(model_path: Path, rows, args, max_length: int = MAX_LENGTH):
    """Build the three steps for `model_path`, warm up, time every batch per phase.

    Returns (results: {phase: summary line}, run: the facts the summary line reports:
    per-batch median ratios to SFT, warm-up time, matmul rates, load averages)."""
    batches = [
        b
        for _, _, b in iterate_batches(
            rows, args.batch_size, seed=args.seed, pad_multiple=16, with_kl=True, loop=False
        )
    ]
    rates = [matmul_rate()]
    print(json.dumps({"bench": "matmul", "gflops": round(rates[0] / 1e9, 1), **machine()}))

    with tempfile.TemporaryDirectory(prefix="mlx_kto_tp_") as tmp:
        kto, kto_bytes, scorers = kto_runner(model_path, args, Path(tmp), max_length)
        with trainer.fast_paths(scorers["kto_warm"].model):  # the row streams KTO steps use
            streams = max(rs.active_streams(), 1)
        sft, sft_bytes = sft_runner(model_path, args)
        fm = FlopModel(scorers["kto_warm"].model)
        sft_batches = [sft_batch(rows, b.index) for b in batches]
        t0 = time.perf_counter()
        for b, sb in zip(batches, sft_batches, strict=True):  # warm-up: compile, fill the cache
            sft(sb)
            kto(b, "kto_warm")
        warmup_s = time.perf_counter() - t0
        before = {p: s.stats() for p, s in scorers.items()}
        loads = [os.getloadavg()[0]]
        times = {p: [] for p in PHASES}
        peaks = dict.fromkeys(PHASES, 0)
        for b, sb in zip(batches, sft_batches, strict=True):
            rates.append(matmul_rate(reps=1))
            for phase in PHASES:
                mx.reset_peak_memory()
                times[phase].append(sft(sb) if phase == "sft" else kto(b, phase))
                other = kto_bytes if phase == "sft" else sft_bytes  # the idle model's bytes
                peaks[phase] = max(peaks[phase], mx.get_peak_memory() - other)
            loads.append(os.getloadavg()[0])
        ref = {p: s.stats()["ref_misses"] - before[p]["ref_misses"] for p, s in scorers.items()}
    rates.append(matmul_rate())
    rate = max(rates)  # the best reading: conservative MFU under shared-machine load
    ntoks = [b.ntoks for b in batches]
    results = {}
    for phase in PHASES:
        flops = [step_flops(fm, rows, b.index, phase) for b in batches]
        results[phase] = summarize(phase, times[phase], ntoks, flops, peaks[phase], rate)
    for p in ("kto_cold", "kto_warm"):  # sequences the timed pass had to compute
        results[p]["ref_misses"] = ref[p]
    ratio = {
        p: statistics.median(t / s for t, s in zip(times[p], times["sft"], strict=True))
        for p in ("kto_cold", "kto_warm")
    }
    run = {
        "cpu_streams": streams,
        "timed_batches": len(batches),
        "warmup_s": round(warmup_s, 1),
        "matmul_gflops_best": round(rate / 1e9, 1),
        "matmul_gflops_median": round(statistics.median(rates) / 1e9, 1),
        "load_avg_1m_min_max": [round(min(loads), 2), round(max(loads), 2)],
        "warm_over_sft": round(ratio["kto_warm"], 3),
        "cold_over_sft": round(ratio["kto_cold"], 3),
    }
    return results, run


def common_args(ap: argparse.ArgumentParser, rows: int, batch_size: int) -> None:
    """The options `measure()` reads (also bench/real_model.py's)."""
    ap.add_argument("--rows", type=int, default=rows, help="rows (timed batches = rows / batch)")
    ap.add_argument("--batch-size", type=int, default=batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-checkpoint", action="store_true", help="checkpoint every block")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a real model folder (default: the bench model)")
    common_args(ap, rows=64, batch_size=8)
    ap.add_argument("--baseline", action="store_true", help="the trainer before issue 6")
    args = ap.parse_args()
    if args.baseline:
        use_baseline()

    model_path = Path(args.model) if args.model else bench_model()
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    rows = bench_rows(args.rows, seed=args.seed, vocab=vocab)
    results, run = measure(model_path, rows, args)
    for r in results.values():
        print(json.dumps(r))
    summary = {
        "bench": "throughput_summary",
        "model": str(model_path),
        "trainer": "baseline (before issue 6)" if args.baseline else "current",
        "cpu_streams": 1 if args.baseline else rs.default_streams(),
        "fast_exp": fastops.wanted(),
        "malloc_tuned": mlx_kto.runtime.heap.tuned,
        "batch_size": args.batch_size,
        **run,
        "mfu_warm": results["kto_warm"]["mfu"],
        "mfu_sft": results["sft"]["mfu"],
    }
    summary["targets_met"] = {
        "warm_over_sft<=1.7": summary["warm_over_sft"] <= 1.7,
        "cold_over_sft<=2.8": summary["cold_over_sft"] <= 2.8,
        "mfu_warm>=0.35": summary["mfu_warm"] >= 0.35,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
