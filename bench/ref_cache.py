"""Step time with a cold and a warm reference cache, on the benchmark model.

    .venv/bin/python bench/ref_cache.py [--rows 64] [--epochs-uncached 1]

One training run (micro-batch 8, max_length 256, LoRA rank 8 on q,k,v,o of all 8 layers of
bench/fixture.py's model) over `rows` rows for four epochs:
  0 uncached  warm-up: compiles the step for the batch shapes (its mean includes compiling)
  1 cold      cache on, empty: every sequence is a miss, computed and stored
  2 warm      cache on, full: every sequence is a hit, no reference forward
  3 uncached  the plain reference pass again, without compile time: the baseline
Prints one JSON line per epoch, then a summary line with warm/cold (the issue expects it to
approach the compute ratio of about 3/5: a warm step skips 2 of ~5 forward-equivalents).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.config.core import KTOConfig  # noqa: E402
from mlx_kto.data.batches import num_batches  # noqa: E402
from mlx_kto.model.load import adapter_config, apply_lora, load_base  # noqa: E402
from mlx_kto.reference.fingerprint import reference_fingerprint  # noqa: E402
from mlx_kto.reference.scorer import RefCache, ReferenceScorer  # noqa: E402
from mlx_kto.train.loop import Run, make_schedule, train_loop  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from fixture import MAX_LENGTH, bench_model, bench_rows  # noqa: E402

PHASES = ("uncached_warmup", "cold", "warm", "uncached")


class PhasedScorer(ReferenceScorer):
    """A scorer whose cache is switched on for epochs 1-2 only (epoch = `per_epoch` calls)."""

    def __init__(self, *args, per_epoch: int, **kw):
        super().__init__(*args, **kw)
        self._cache, self.cache = self.cache, None
        self.per_epoch, self.calls = per_epoch, 0

    def __call__(self, batch):
        epoch = self.calls // self.per_epoch
        self.cache = self._cache if epoch in (1, 2) else None
        self.calls += 1
        return super().__call__(batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rows per epoch")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_path = bench_model()
    rows = bench_rows(args.rows, seed=args.seed)
    keys = [f"self_attn.{p}_proj" for p in "qkvo"]
    cfg = KTOConfig(
        model=str(model_path), batch_size=args.batch_size, max_length=MAX_LENGTH, lora_rank=8,
        lora_keys=keys, num_layers=-1, learning_rate=1e-4, warmup_steps=0, steps_per_eval=0,
        steps_per_save=0, keep_checkpoints=1, quiet=True, seed=args.seed,
    ).validate()  # fmt: skip
    model, _, path, _ = load_base(cfg)
    apply_lora(model, cfg)
    per_epoch = num_batches(len(rows), cfg.batch_size, 2)
    n_steps = per_epoch * len(PHASES)
    optimizer = optim.AdamW(learning_rate=make_schedule(cfg, n_steps))
    optimizer.init(model.trainable_parameters())

    with tempfile.TemporaryDirectory(prefix="mlx_kto_bench_") as tmp:
        cache = RefCache(Path(tmp) / "cache")
        fp = reference_fingerprint(path, memo=cache)
        scorer = PhasedScorer(model, cache=cache, fingerprint=fp, per_epoch=per_epoch)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        a_config = adapter_config(cfg, str(path), len(model.layers))
        run = Run(
            cfg, model, optimizer, rows, scorer, run_dir, a_config, n_steps, log=lambda *_: None
        )
        train_loop(run, progress=False)
        records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        entries = cache.info()["entries"]

    summary = {"bench": "ref_cache", "device": str(mx.default_device()), "rows": len(rows),
               "batch_size": cfg.batch_size, "max_length": MAX_LENGTH, "steps_per_epoch": per_epoch,
               "cache_entries": entries}  # fmt: skip
    for i, phase in enumerate(PHASES):
        recs = records[i * per_epoch : (i + 1) * per_epoch]
        times = [r["step_time"] for r in recs]
        line = {
            "bench": "ref_cache", "epoch": i, "phase": phase, "steps": len(recs),
            "mean_step_s": round(statistics.mean(times), 4),
            "median_step_s": round(statistics.median(times), 4),
            "mean_ref_s": round(statistics.mean(r["ref_time"] for r in recs), 4),
            "ref_forwards": sum(r["ref_forwards"] for r in recs),  # per-step counts
            "ref_hits": sum(r["ref_hits"] for r in recs),  # per-step counts
            "ref_misses": sum(r["ref_misses"] for r in recs),  # per-step counts
            "tokens_per_sec": round(sum(r["tokens"] for r in recs) / sum(times), 1),
        }  # fmt: skip
        print(json.dumps(line), flush=True)
        summary[f"{phase}_mean_step_s"] = line["mean_step_s"]
    summary["warm_over_cold"] = round(summary["warm_mean_step_s"] / summary["cold_mean_step_s"], 3)
    summary["warm_over_uncached"] = round(
        summary["warm_mean_step_s"] / summary["uncached_mean_step_s"], 3
    )
    summary["cold_over_uncached"] = round(
        summary["cold_mean_step_s"] / summary["uncached_mean_step_s"], 3
    )
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
