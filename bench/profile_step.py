"""Where the CPU time of a warm KTO step (or of the reference forward) goes, by op family.

    .venv/bin/python bench/profile_step.py --mode warm   # steps with the reference cached
    .venv/bin/python bench/profile_step.py --mode ref    # the batched reference forward
    .venv/bin/python bench/profile_step.py --model ~/.cache/mlx_kto_test/SmolLM2-135M-Instruct.Q4_1.gguf
    options: --rows 32 --batch-size 8 --iters 4 --no-perf --no-packing --max-tokens 512

The bench fixture (bench/fixture.py: equal lengths, nothing to pack) or, with --model (a GGUF
file or a model folder, loaded as `train --model` loads it), bench/real_h2h.py's seeded chat
rows with log-normal prompt and completion lengths up to --max-tokens; the step of
bench/throughput.py (what `train_loop` runs per micro-batch, inside `trainer.fast_paths`),
its micro-batches packed unless --no-packing. Each pass line has its model FLOPs (real tokens
only, bench/throughput.py's FlopModel) and MFU against the matmul rate measured in the run. A warm-up pass over every batch first
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
from fixture import MAX_LENGTH, bench_model, bench_rows  # noqa: E402
from throughput import FlopModel, kto_runner, machine, matmul_rate, step_flops  # noqa: E402

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


def real_rows(model_path: Path, n: int, max_tokens: int, seed: int = 0):
    """bench/real_h2h.py's chat rows, tokenized as `train` does, with KL partners."""
    from mlx_kto.data.rows import examples_from_rows
    from mlx_kto.data.tokenize import assign_kl_partners, tokenize_examples
    from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer

    from mlx_lm.utils import load_tokenizer
    from real_h2h import chat_rows

    gguf = model_path.suffix == ".gguf"
    tok = load_gguf_tokenizer(model_path) if gguf else load_tokenizer(model_path)
    raw = [(r, f"real[{i}]") for i, r in enumerate(chat_rows(tok, n, max_tokens, seed))]
    rows, _ = tokenize_examples(examples_from_rows(raw, "real", seed), tok, max_tokens)
    assign_kl_partners(rows, seed=seed, max_length=max_tokens)
    return rows


def child(args) -> None:
    """The profiled process: warm-up, then the timed passes between perf enable/disable."""
    if args.model:
        model_path, max_length = Path(args.model).expanduser(), args.max_tokens
        rows = real_rows(model_path, args.rows, max_length)
    else:
        model_path, max_length = bench_model(), MAX_LENGTH
        vocab = json.loads((model_path / "config.json").read_text())["vocab_size"]
        rows = bench_rows(args.rows, seed=0, vocab=vocab)
    batches = [
        b
        for _, _, b in iterate_batches(
            rows, args.batch_size, seed=0, pad_multiple=16, with_kl=True, loop=False,
            packing=args.packing, pass_tokens=args.pass_tokens,
        )
    ]  # fmt: skip
    ns = argparse.Namespace(
        batch_size=args.batch_size, seed=0, grad_checkpoint=False, baseline=False
    )
    with tempfile.TemporaryDirectory(prefix="mlx_kto_prof_") as tmp:
        run, _, scorers = kto_runner(model_path, ns, Path(tmp), max_length)
        scorer = scorers["kto_warm"]
        # no cache: every call is a reference forward
        plain = type(scorer)(scorer.model, packing=args.packing, pass_tokens=args.pass_tokens)
        flops = FlopModel(scorer.model)

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
        mfus = []
        for it in range(args.iters):
            for j, b in enumerate(batches):
                c0 = resource.getrusage(resource.RUSAGE_SELF)
                wall = one(b)
                c1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
                if args.mode == "warm":
                    f = step_flops(flops, rows, b.index, "kto_warm")
                else:  # the reference forward of the main and KL sequences
                    f = flops.forward([len(rows[i].tokens) for i in b.index])
                    f += flops.forward([len(rows[i].kl_tokens) for i in b.index])
                mfus.append(f / wall / rate)
                rec = {"bench": "profile_pass", "mode": args.mode, "iter": it, "batch": j,
                       "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                       "cores_used": round(cpu / wall, 2), "tokens": int(b.ntoks),
                       "computed": int(b.computed), "packed": b.packed is not None,
                       "peak_mb": round(mx.get_peak_memory() / 2**20, 1),
                       "gflop": round(f / 1e9, 2), "mfu": round(f / wall / rate, 4)}  # fmt: skip
                print(json.dumps(rec), flush=True)
        if ctl:
            with open(ctl, "w") as f:
                f.write("disable\n")
        print(json.dumps({"bench": "profile_matmul", "gflops": round(rate / 1e9, 1)}), flush=True)
        real = sum(len(r.tokens) + len(r.kl_tokens) for r in rows)
        computed = sum(b.computed for b in batches)
        print(json.dumps({"bench": "profile_summary", "mode": args.mode,
                          "model": model_path.name, "packing": args.packing,
                          "padding_share": round(1 - real / computed, 4),
                          "mfu_median": round(sorted(mfus)[len(mfus) // 2], 4),
                          "matmul_gflops": round(rate / 1e9, 1)}), flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["warm", "ref"], default="warm")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--iters", type=int, default=2, help="timed passes over the batches")
    ap.add_argument("--no-perf", action="store_true", help="time only")
    ap.add_argument("--top", type=int, default=25, help="top symbols to print")
    ap.add_argument("--model", default=None, help="a GGUF file or model folder (default: fixture)")
    ap.add_argument("--max-tokens", type=int, default=512, help="--model rows: longest row")
    ap.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--pass-tokens", type=int, default=1024, help="tokens per packed pass")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(json.dumps({"bench": "profile_machine", **machine()}), flush=True)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        args.mode,
        "--rows",
        str(args.rows),
        "--batch-size",
        str(args.batch_size),
        "--iters",
        str(args.iters),
        "--max-tokens",
        str(args.max_tokens),
        "--packing" if args.packing else "--no-packing",
        "--pass-tokens",
        str(args.pass_tokens),
    ]
    cmd += ["--model", args.model] if args.model else []  # fmt: skip
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
