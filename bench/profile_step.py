"""Where the CPU time of a warm KTO step (or of the reference forward) goes, by op family.

    .venv/bin/python bench/profile_step.py --mode warm   # steps with the reference cached
    .venv/bin/python bench/profile_step.py --mode ref    # the batched reference forward
    options: --rows 32 --batch-size 8 --iters 4 --no-perf

The bench fixture (bench/fixture.py) and the step of bench/throughput.py (what `train_loop`
runs per micro-batch, inside `trainer.fast_paths`). A warm-up pass over every batch first
(compiles, fills the cache), then `--iters` timed passes. With perf on PATH the timed passes run
under `perf record -e cpu-clock` (started disabled, enabled through a control fifo only for the
timed passes), and the samples are grouped into op families by symbol (`FAMILIES`). JSON lines:
one per timed pass (wall, CPU seconds, cores used), one per family (share of samples), the top
symbols, and the fp32 2048^3 matmul rate of the same process (the ceiling).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.data.batches import iterate_batches  # noqa: E402
from mlx_kto.train import loop as trainer  # noqa: E402

import mlx.core as mx  # noqa: E402
from fixture import bench_model, bench_rows  # noqa: E402
from throughput import kto_runner, machine, matmul_rate  # noqa: E402

# (family, regex on "dso symbol"), first match wins. Order matters: BLAS before "copy" etc.
FAMILIES = [
    ("matmul (BLAS)", r"^libopenblas|^libblas|^libmkl|sgemm|gemm_|gemv"),
    # mx.compile's generated kernels are their own shared objects named for the fused ops.
    ("compiled (fused) kernels", r"^lib[A-Z]"),
    ("exp (libm / mlx simd)", r"simd::exp|__fmaf|^libm\.so.* (__)?expf?"),
    ("softmax / logsumexp", r"[Ss]oftmax|LogSumExp|logsumexp"),
    ("reductions", r"reduction_op|[Rr]educe|arg_reduce|ArgReduce"),
    (
        "copies / gather / scatter",
        r"copy_|[Gg]ather|[Ss]catter|memcpy|memmove|[Cc]oncatenate|[Pp]ad|[Ss]lice",
    ),
    (
        "elementwise, unfused (binary/unary/ternary)",
        r"binary_op|unary_op|ternary_op|[Bb]inary|[Uu]nary",
    ),
    (
        "allocation / page faults",
        r"malloc|_int_free|cfree|memset|clear_page|page_fault|do_anonymous|mmap|munmap|madvise|handle_mm_fault|zap_|folio|memcg|alloc",
    ),
    (
        "python / graph building",
        r"^libpython|^python|_PyEval|nanobind|^libmlx\.so mlx::core::(array|eval|detail|simplify|compile|Primitive)",
    ),
    (
        "kernel: scheduling / idle",
        r"\[kernel\.kallsyms\] .*(sched|switch|futex|idle|irq|tick|wake)",
    ),
    ("kernel (other)", r"\[kernel\.kallsyms\]"),
]


def classify(dso_sym: str) -> str:
    for name, pat in FAMILIES:
        if re.search(pat, dso_sym):
            return name
    return "other"


def perf_samples(data: Path) -> Counter:
    """Samples per 'dso symbol' from a perf.data (all threads of the process)."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio",
         "--percent-limit", "0", "-F", "sample,dso,symbol", "--demangle"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    counts = Counter()
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+(\S+)\s+\[[.k]\]\s+(.*)$", line)
        if m:
            counts[f"{m.group(2)} {m.group(3).strip()}"] += int(m.group(1))
    return counts


def child(args) -> None:
    """The profiled process: warm-up, then the timed passes between perf enable/disable."""
    model_path = bench_model()
    vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
    rows = bench_rows(args.rows, seed=0, vocab=vocab)
    batches = [
        b
        for _, _, b in iterate_batches(
            rows, args.batch_size, seed=0, pad_multiple=16, with_kl=True, loop=False
        )
    ]
    ns = argparse.Namespace(
        batch_size=args.batch_size, seed=0, grad_checkpoint=False, baseline=False
    )
    with tempfile.TemporaryDirectory(prefix="mlx_kto_prof_") as tmp:
        run, _, scorers = kto_runner(model_path, ns, Path(tmp))
        scorer = scorers["kto_warm"]
        plain = type(scorer)(scorer.model)  # no cache: every call is a reference forward

        def one(b):
            mx.reset_peak_memory()
            t0 = time.perf_counter()
            if args.mode == "warm":
                run(b, "kto_warm")
            else:
                with trainer.fast_paths(scorer.model):
                    mx.eval(*[x for x in plain(b) if x is not None])
            return time.perf_counter() - t0

        for b in batches:
            one(b)
            if args.mode == "warm":
                run(b, "kto_warm")  # the cache now holds the batch
        rate = matmul_rate()
        ctl = os.environ.get("PROFILE_CTL")
        if ctl:
            with open(ctl, "w") as f:
                f.write("enable\n")
        for it in range(args.iters):
            for j, b in enumerate(batches):
                c0 = resource.getrusage(resource.RUSAGE_SELF)
                wall = one(b)
                c1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                rec = {"bench": "profile_pass", "mode": args.mode, "iter": it, "batch": j,
                       "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                       "cores_used": round(cpu / wall, 2), "tokens": int(b.ntoks),
                       "peak_mb": round(mx.get_peak_memory() / 2**20, 1)}  # fmt: skip
                print(json.dumps(rec), flush=True)
        if ctl:
            with open(ctl, "w") as f:
                f.write("disable\n")
        print(json.dumps({"bench": "profile_matmul", "gflops": round(rate / 1e9, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["warm", "ref"], default="warm")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2, help="timed passes over the batches")
    ap.add_argument("--no-perf", action="store_true", help="time only")
    ap.add_argument("--top", type=int, default=25, help="top symbols to print")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(json.dumps({"bench": "profile_machine", **machine()}), flush=True)
    cmd = [sys.executable, __file__, "--child", "--mode", args.mode, "--rows", str(args.rows),
           "--batch-size", str(args.batch_size), "--iters", str(args.iters)]  # fmt: skip
    if args.no_perf or shutil.which("perf") is None:
        subprocess.run(cmd, check=True)
        return
    with tempfile.TemporaryDirectory(prefix="mlx_kto_perf_") as tmp:
        fifo, data = Path(tmp) / "ctl", Path(tmp) / "perf.data"
        os.mkfifo(fifo)
        perf = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "499", "-D", "-1",
                "--control", f"fifo:{fifo}", "-o", str(data), "--"]  # fmt: skip
        subprocess.run(perf + cmd, check=True, env={**os.environ, "PROFILE_CTL": str(fifo)})
        counts = perf_samples(data)
    total = sum(counts.values()) or 1
    fam = Counter()
    for k, v in counts.items():
        fam[classify(k)] += v
    for name, v in fam.most_common():
        print(json.dumps({"bench": "profile_family", "mode": args.mode, "family": name,
                          "share": round(v / total, 4), "samples": v}))  # fmt: skip
    for k, v in counts.most_common(args.top):
        print(json.dumps({"bench": "profile_symbol", "mode": args.mode, "symbol": k[:160],
                          "family": classify(k), "share": round(v / total, 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
