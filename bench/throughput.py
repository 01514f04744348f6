"""Training throughput: KTO step (cold and warm reference cache) vs an mlx-lm LoRA SFT step.

    .venv/bin/python bench/throughput.py [--model PATH] [--rows 64] [--batch-size 8]

One process, one model, the same rows (bench/fixture.py: ~64 prompt + ~128 completion tokens,
micro-batch 8, max_length 256, LoRA rank 8 on q,k,v,o of every block):

  matmul     fp32 [2048, 2048] @ [2048, 2048] rate, measured at the start and the end
  kto_cold   one epoch of `mlx_kto.trainer.train_loop` with a fresh reference cache: every
             sequence misses, so each step runs the batched reference forward (+ stores it)
  kto_warm   the next epoch: every reference log-prob is a cache hit, no reference forward
  sft        mlx-lm's compiled LoRA SFT step (`default_loss`, its `step` pattern) on the very
             row groups of the warm epoch, padded the way mlx-lm pads (1 + 32k)

A warm-up epoch (uncached reference, not timed) first compiles the KTO step for the batch
shapes; SFT gets the same warm-up. Each result is one JSON line: median step seconds,
tokens/s (real, non-padding tokens of the main sequences), peak memory of the phase, model
FLOPs per step and MFU against the measured matmul rate. A last line holds the ratios the
issue sets targets for (warm/sft <= 1.7, cold/sft <= 2.8, MFU(warm) >= 0.35).

FLOPs are counted on real tokens only (padding is waste, not work): forward = 2 x (base +
LoRA matmul weights) per token + causal attention; a LoRA backward = the input gradients
(same matmul FLOPs as the forward, attention twice) + the LoRA weight gradients. So SFT is
about 2 forward-equivalents, a warm KTO step 3 (+ the KL forward), a cold one 5.
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

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from fixture import MAX_LENGTH, bench_model, bench_rows  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlx_kto.batches import batch_order, num_batches  # noqa: E402
from mlx_kto.config import KTOConfig  # noqa: E402
from mlx_kto.model import adapter_config, apply_lora, load_base  # noqa: E402
from mlx_kto.reference import ReferenceScorer  # noqa: E402
from mlx_kto.trainer import TrainState, make_schedule, train_loop  # noqa: E402

LORA_KEYS = [f"self_attn.{p}_proj" for p in "qkvo"]
PHASES = ("warmup", "kto_cold", "kto_warm")


def machine() -> dict:
    return {
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "mlx": mx.__version__,
        "blas": getattr(mlx_kto._blas, "loaded", None),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
    """Median fp32 GEMM rate in FLOP/s (the MFU denominator)."""
    a = mx.random.normal((n, n))  # [n, n]
    b = mx.random.normal((n, n))  # [n, n]
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


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
            base += emb.weight.shape[0] * emb.weight.shape[1]  # the tied head as a matmul
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


# -- KTO phases through the real training loop ----------------------------------------------------


class PhasedScorer(ReferenceScorer):
    """Phase by call count: warm-up uncached, then a fresh on-disk cache (cold), then the same
    cache full (warm). Falls back to an in-memory cache if the on-disk one is unavailable.
    Resets the peak-memory counter at each phase start."""

    def __init__(self, model, per_epoch: int, cache_dir: Path, model_path: Path):
        super().__init__(model)
        self.per_epoch, self.calls = per_epoch, 0
        self.peaks: dict[str, int] = {}
        try:
            from mlx_kto.fingerprint import reference_fingerprint
            from mlx_kto.reference import RefCache

            self.disk = RefCache(cache_dir)
            self.fp = reference_fingerprint(model_path, memo=self.disk)
            self.memo = None
        except (ImportError, OSError) as e:  # no cache module: precomputed values in memory
            print(f"# on-disk cache unavailable ({e}); warm phase uses an in-memory dict")
            self.disk, self.memo = None, {}

    def phase(self) -> str:
        return PHASES[min(self.calls // self.per_epoch, len(PHASES) - 1)]

    def __call__(self, batch):
        if self.calls % self.per_epoch == 0:
            if self.calls:
                self.peaks[PHASES[self.calls // self.per_epoch - 1]] = mx.get_peak_memory()
            mx.reset_peak_memory()
        p = self.phase()
        self.calls += 1
        if p != "warmup" and self.disk is not None and self.cache is None:
            self.cache, self.fingerprint = self.disk, self.fp.id
            self.fp_id = self.disk.register(self.fp)
        if self.memo is not None and p == "kto_warm":
            key = tuple(batch.index)
            if key in self.memo:  # only when this exact batch was seen (same rows)
                self.hits += 2 * len(key)
                return self.memo[key]
        out = super().__call__(batch)
        if self.memo is not None:
            self.memo[tuple(batch.index)] = out
        return out


def run_kto(model_path: Path, rows, args, fm: FlopModel, tmp: Path) -> tuple[list, list]:
    cfg = KTOConfig(
        model=str(model_path), batch_size=args.batch_size, max_length=MAX_LENGTH,
        lora_rank=8, lora_keys=LORA_KEYS, num_layers=-1, learning_rate=1e-5, warmup_steps=0,
        steps_per_eval=0, steps_per_save=0, keep_checkpoints=1, quiet=True, seed=args.seed,
        grad_checkpoint=args.grad_checkpoint,
    ).validate()  # fmt: skip
    model, _, path, _ = load_base(cfg)
    apply_lora(model, cfg)
    if cfg.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    per_epoch = num_batches(len(rows), cfg.batch_size, 2)
    n_steps = per_epoch * len(PHASES)
    optimizer = optim.AdamW(learning_rate=make_schedule(cfg, n_steps))
    optimizer.init(model.trainable_parameters())
    scorer = PhasedScorer(model, per_epoch, tmp / "cache", path)
    run_dir = tmp / "run"
    run_dir.mkdir()
    mx.reset_peak_memory()
    train_loop(
        model, cfg, rows, None, scorer, optimizer, TrainState(), run_dir,
        adapter_config(cfg, str(path), len(model.layers)), 1.0, n_steps,
        log=lambda *_: None, progress=False,
    )  # fmt: skip
    scorer.peaks[PHASES[-1]] = mx.get_peak_memory()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results = []
    for e, phase in enumerate(PHASES):
        if phase == "warmup":
            continue
        recs = records[e * per_epoch : (e + 1) * per_epoch]
        order = batch_order(rows, cfg.batch_size, cfg.seed, e, True, 2)
        flops = [step_flops(fm, rows, idx, phase) for idx in order]
        results.append(
            summarize(
                phase,
                [r["step_time"] for r in recs],
                [r["tokens"] for r in recs],
                flops,
                scorer.peaks[phase],
                ref_forwards=recs[-1]["ref_forwards"] - records[e * per_epoch - 1]["ref_forwards"],
                ref_s=round(statistics.median(r["ref_time"] for r in recs), 4),
            )
        )
    del model, optimizer, scorer
    return results, batch_order(rows, cfg.batch_size, cfg.seed, PHASES.index("kto_warm"), True, 2)


# -- the mlx-lm SFT ceiling -----------------------------------------------------------------------


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


def run_sft(model_path: Path, rows, order, args, fm: FlopModel) -> dict:
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
    batches = [sft_batch(rows, idx) for idx in order]
    for b in batches:  # warm-up: compile every shape once
        mx.eval(step(b, None, True), state)
    mx.reset_peak_memory()
    times = []
    for b in batches:
        t0 = time.perf_counter()
        lvalue, toks, _ = step(b, None, True)
        mx.eval(lvalue, toks, state)
        times.append(time.perf_counter() - t0)
    peak = mx.get_peak_memory()
    ntoks = [sum(len(rows[i].tokens) for i in idx) for idx in order]
    flops = [step_flops(fm, rows, idx, "sft") for idx in order]
    return summarize("sft", times, ntoks, flops, peak)


# -- reporting --------------------------------------------------------------------------------------


def summarize(phase, times, ntoks, flops, peak, **extra) -> dict:
    med = statistics.median(times)
    return {
        "bench": "throughput",
        "phase": phase,
        "steps": len(times),
        "median_step_s": round(med, 4),
        "min_step_s": round(min(times), 4),
        "tokens_per_s": round(sum(ntoks) / sum(times), 1),
        "peak_memory_mb": round(peak / 2**20, 1),
        "gflop_per_step": round(statistics.mean(flops) / 1e9, 2),
        "achieved_gflops": round(sum(flops) / sum(times) / 1e9, 2),
        **extra,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a real model folder or hub id (default: the bench model)")
    ap.add_argument("--rows", type=int, default=64, help="rows per epoch (steps = rows / batch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grad-checkpoint", action="store_true", help="checkpoint every block")
    ap.add_argument("--skip-sft", action="store_true")
    args = ap.parse_args()

    model_path = Path(args.model) if args.model else bench_model()
    cfg = KTOConfig(model=str(model_path), lora_rank=8, lora_keys=LORA_KEYS)
    probe, _, _, _ = load_base(cfg)
    apply_lora(probe, cfg)
    fm = FlopModel(probe)
    vocab = probe.args.vocab_size
    del probe
    rows = bench_rows(args.rows, seed=args.seed, vocab=vocab)

    rate0 = matmul_rate()
    print(json.dumps({"bench": "matmul", "when": "start", "gflops": round(rate0 / 1e9, 1),
                      **machine()}), flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mlx_kto_tp_") as tmp:
        kto, order = run_kto(model_path, rows, args, fm, Path(tmp))
    sft = None if args.skip_sft else run_sft(model_path, rows, order, args, fm)
    rate1 = matmul_rate()
    rate = max(rate0, rate1)  # the faster reading: a conservative MFU
    print(json.dumps({"bench": "matmul", "when": "end", "gflops": round(rate1 / 1e9, 1),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)  # fmt: skip
    results = kto + ([sft] if sft else [])
    for r in results:
        r["mfu"] = round(r["achieved_gflops"] * 1e9 / rate, 3)
        print(json.dumps(r), flush=True)
    by = {r["phase"]: r for r in results}
    summary = {
        "bench": "throughput_summary",
        "model": str(model_path),
        "batch_size": args.batch_size,
        "rows": len(rows),
        "matmul_gflops": round(rate / 1e9, 1),
        "mfu_warm": by["kto_warm"]["mfu"],
    }
    if sft:
        summary["warm_over_sft"] = round(by["kto_warm"]["median_step_s"] / sft["median_step_s"], 3)
        summary["cold_over_sft"] = round(by["kto_cold"]["median_step_s"] / sft["median_step_s"], 3)
    summary["targets_met"] = {
        "warm_over_sft<=1.7": summary.get("warm_over_sft", 9) <= 1.7,
        "cold_over_sft<=2.8": summary.get("cold_over_sft", 9) <= 2.8,
        "mfu_warm>=0.35": summary["mfu_warm"] >= 0.35,
    }
    summary["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
