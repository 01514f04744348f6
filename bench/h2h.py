"""Head to head: mlx-kto vs TRL 1.16 KTOTrainer + PEFT (torch CPU), same fixture, one run.

    .venv/bin/python bench/h2h.py                      # the full comparison (quiet machine!)
    .venv/bin/python bench/h2h.py --rows 16 --epochs 1 # a smoke run of every phase
    options: --rows 256 --epochs 3 --batch-size 8 --lr 5e-5 --seed 0
             --skip-trl / --skip-mlx   run one side only
             --trl-no-precompute       also run TRL without precompute_ref_log_probs
             --trl-venv DIR            where the TRL venv lives (created if missing)

The TRL side runs in its own venv, which this script creates on first use (never part of the
tests or of the project's dependencies): $MLX_KTO_BENCH_TRL_VENV or
~/.cache/mlx_kto_bench/trl-venv, `python -m venv` + `pip install -r bench/h2h-requirements.txt`
(torch 2.13.0 CPU, transformers 5.24.0, peft 0.21.2, trl 1.16.0 and their dependencies,
frozen). Everything runs offline.

Fixture (bench/h2h_fixture.py): bench/fixture.py's model (random-init Llama, hidden 512 x 8
layers, intermediate 1408, 8 / 4 KV heads, vocab 8000, untied, fp32) with an id-as-word
tokenizer, and bench_rows' rows (~64 prompt + ~128 completion tokens + EOS, balanced labels) as
text that both trainers tokenize to exactly the same ids (checked on both sides); before
training, HF LlamaForCausalLM's logits on a few tokens must match MLX's to 1e-4.

Both trainers, each a fresh process, one after the other: micro-batch 8, max_length 256,
LoRA r 8 / alpha 16 on q,k,v,o of every block, beta 0.1, AdamW lr 5e-5, cosine after a 10%
linear warmup, grad clip 1.0, seed 0, no eval, a log line per step.

  mlx      `python -m mlx_kto.train` (through bench/h2h_mlx_runner.py, which stamps each
           metrics.jsonl write) with a fresh, empty --ref-cache: the reference pass happens
           inside epoch 1, later epochs hit the cache.
  trl      KTOTrainer(precompute_ref_log_probs=True): the reference pass runs up front in
           __init__ (bench/h2h_trl_runner.py; a TrainerCallback stamps every step).
  trl_noprecompute  (with --trl-no-precompute) the reference forward inside every step.

Output: JSON lines on stdout (and in RUN_DIR/h2h.jsonl): the machine; the checks; the fp32
2048^3 matmul rate of torch and of MLX (+ the BLAS mlx_kto loads), measured before and after
the trainers; one line per trainer: wall_s (the whole process, spawn to exit), startup_s (to
the first step; TRL's includes its precompute), ref_pass_s, loop_s, tail_s (after the last
step: saving, plots), epoch1_s, warm_step_median_s (steps with the reference cached; end of
step to end of step, everything included), step_time_median_s (each trainer's own step span),
peak_rss_mb (ru_maxrss of the child, from wait4), cpu_s and cores_used; and a last line with
one "efficiency" line per trainer (model FLOPs of a mean warm step over its median time,
as a share of its framework's best matmul rate: see warm_step_flops); and a last line with
the mlx/trl ratios and issue 15's floors (wall < 1, warm step <= 1, peak RSS <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TRL_VERSION = "1.16.0"
LORA_KEYS = "self_attn.q_proj,self_attn.k_proj,self_attn.v_proj,self_attn.o_proj"
MAX_LENGTH = 256
LOGIT_TOL = 1e-4


def emit(record: dict, sink) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    sink.write(line + "\n")
    sink.flush()


def note(msg: str) -> None:
    print(f"[h2h {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    print(f"h2h: error: {msg}", file=sys.stderr)
    sys.exit(2)


# -- the TRL venv ---------------------------------------------------------------------------


def trl_python(venv: Path) -> Path:
    """The TRL venv's python, creating the venv (pinned requirements) when it is missing."""
    py = venv / "bin" / "python"
    probe = f"import torch, peft, trl; assert trl.__version__ == {TRL_VERSION!r}"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    note(f"creating the TRL venv in {venv} (torch CPU + trl {TRL_VERSION}; a few minutes)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    req = HERE / "h2h-requirements.txt"
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", str(req)], check=True)
    if subprocess.run([py, "-c", probe]).returncode != 0:
        fail(f"{venv}: trl {TRL_VERSION} does not import after installing {req}")
    return py


# -- child processes ------------------------------------------------------------------------


def run_child(name: str, cmd: list, log: Path, env: dict | None = None) -> dict:
    """Run cmd to completion (output to log); wall time and the child's own rusage."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=HERE
        )
        _, status, ru = os.wait4(proc.pid, 0)
    t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        fail(f"{name} exited with {proc.returncode}; last lines of {log}:\n" + "\n".join(tail))
    return {
        "t_spawn": t0,
        "t_exit": t1,
        "wall_s": t1 - t0,
        "peak_rss_mb": ru.ru_maxrss / 1024,  # Linux: KiB
        "cpu_s": ru.ru_utime + ru.ru_stime,
    }


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def median(xs) -> float | None:
    xs = list(xs)
    return statistics.median(xs) if xs else None


def r3(x):
    return None if x is None else round(x, 3)


# -- per-trainer summaries ------------------------------------------------------------------


def summarize_mlx(proc: dict, rec: dict, metrics: list[dict], per_epoch: int) -> dict:
    """Phases from metrics.jsonl (step_time, ref_time, cumulative ref counters) and the
    wall time of each metrics write (the end of each step)."""
    ends = rec["step_end_times"]
    if len(ends) != len(metrics) or not metrics:
        raise SystemExit(f"h2h: {len(ends)} step stamps for {len(metrics)} metrics lines")
    loop_start = ends[0] - metrics[0]["step_time"]
    intervals = [ends[0] - loop_start] + [b - a for a, b in zip(ends, ends[1:])]
    # the step's own reference misses (older metrics.jsonl had only the running total)
    if "ref_misses_total" in metrics[0]:
        new_misses = [m.get("ref_misses", 0) for m in metrics]
    else:
        misses = [m.get("ref_misses", 0) for m in metrics]
        new_misses = [misses[0]] + [b - a for a, b in zip(misses, misses[1:])]
    warm = [i for i, n in enumerate(new_misses) if n == 0]
    return {
        **_common(proc, loop_start, ends[-1], len(metrics)),
        "ref_pass_s": r3(sum(m.get("ref_time", 0.0) for m in metrics)),
        "epoch1_s": r3(sum(intervals[:per_epoch])),
        "warm_steps": len(warm),
        "warm_step_median_s": r3(median(intervals[i] for i in warm)),
        "step_time_median_s": r3(median(metrics[i]["step_time"] for i in warm)),
        "cold_step_median_s": r3(
            median(intervals[i] for i in range(len(metrics)) if new_misses[i])
        ),
        "mlx_peak_memory_gb": max(m.get("peak_memory_gb", 0.0) for m in metrics),
        "tokens": sum(m.get("tokens", 0) for m in metrics),
        "first_loss": r3(metrics[0].get("loss")),
        "last_loss": r3(metrics[-1].get("loss")),
    }


def summarize_trl(proc: dict, rec: dict, per_epoch: int, precompute: bool) -> dict:
    steps = rec["steps"]
    if not steps or any(e is None for _, e in steps):
        raise SystemExit("h2h: the TRL run recorded no complete step")
    loop_start, loop_end = steps[0][0], steps[-1][1]
    intervals = [steps[0][1] - loop_start] + [b[1] - a[1] for a, b in zip(steps, steps[1:])]
    spans = [e - b for b, e in steps]
    ref_pass = rec["precompute_s"] if precompute else rec["ref_in_steps_s"]
    if not precompute and not rec["ref_in_steps_calls"]:
        ref_pass = None  # the in-step timer never fired: no figure rather than a false 0
    # With precompute every step has the reference cached; the first one also pays warm-up.
    warm = list(range(1, len(steps))) if precompute and len(steps) > 1 else []
    out = {
        **_common(proc, loop_start, loop_end, len(steps)),
        "ref_pass_s": r3(ref_pass),
        "epoch1_s": r3(sum(intervals[:per_epoch])),
        "warm_steps": len(warm),
        "warm_step_median_s": r3(median(intervals[i] for i in warm)),
        "step_time_median_s": r3(median(spans[i] for i in warm)),
        "cold_step_median_s": None if precompute else r3(median(intervals)),
        "import_s": r3(rec["t_imported"] - proc["t_spawn"]),
        "trainer_init_s": r3(rec["t_trainer_built"] - rec["t_model_loaded"]),
        "rss_after_init_mb": round(rec["rss_trainer_built_mb"]),
        "torch_threads": rec["torch_threads"],
        "attn_implementation": rec["attn_implementation"],
        "versions": rec["versions"],
        "first_loss": r3(rec["first_loss"]),
        "last_loss": r3(rec["last_loss"]),
    }
    return out


def _common(proc: dict, loop_start: float, loop_end: float, n_steps: int) -> dict:
    return {
        "wall_s": r3(proc["wall_s"]),
        "startup_s": r3(loop_start - proc["t_spawn"]),
        "loop_s": r3(loop_end - loop_start),
        "tail_s": r3(proc["t_exit"] - loop_end),
        "steps": n_steps,
        "peak_rss_mb": round(proc["peak_rss_mb"]),
        "cpu_s": r3(proc["cpu_s"]),
        "cores_used": r3(proc["cpu_s"] / proc["wall_s"]),
    }


def warm_step_flops(ids_path: Path, per_epoch: int, rank: int = 8) -> float:
    """Model FLOPs of a mean warm step (bench/throughput.py's count, from the config): per
    token of length-L rows, forward 2 x (base + LoRA matmul weights) + causal attention
    4 x (L+1)/2 x layers x heads x head_dim; the LoRA backward 2 x base + 4 x LoRA + twice the
    attention; a warm step = forward + backward of the main rows + the KL forward (taken at
    the main rows' lengths: the same tokens in all, paired differently by the two trainers)."""
    from fixture import BENCH_SHAPE as S

    h, layers, inter = S["hidden_size"], S["num_hidden_layers"], S["intermediate_size"]
    hd = h // S["num_attention_heads"]
    kv = S["num_key_value_heads"] * hd
    base = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + S["vocab_size"] * h
    lora = layers * rank * (2 * (h + h) + 2 * (h + kv))  # q, o: h -> h; k, v: h -> kv
    width = layers * S["num_attention_heads"] * hd
    total = 0.0
    for row in json.loads(ids_path.read_text()):
        L = len(row["prompt_ids"]) + len(row["completion_ids"])
        attn = 2 * 2 * (L + 1) / 2 * width
        fwd = L * (2 * (base + lora) + attn)
        bwd = L * (2 * base + 4 * lora + 2 * attn)
        total += 2 * fwd + bwd
    return total / per_epoch


def mlx_train_args(model, data, adapter, ref_cache, args) -> list[str]:
    """`python -m mlx_kto.train` arguments of the mlx-kto side (args: rows, epochs, batch_size,
    lr, seed); also bench/rss_probe.py's default command."""
    warmup = int(0.1 * (args.rows // args.batch_size * args.epochs))  # as main(): 10% of steps
    cmd = [
        "--model", model, "--data", data, "--adapter-path", adapter, "--ref-cache", ref_cache,
        "--epochs", args.epochs, "--batch-size", args.batch_size,
        "--learning-rate", args.lr, "--lr-schedule", "cosine", "--warmup-steps", warmup,
        "--beta", 0.1, "--max-length", MAX_LENGTH, "--lora-rank", 8, "--lora-alpha", 16,
        "--lora-keys", LORA_KEYS, "--seed", args.seed, "--steps-per-eval", 0, "--quiet",
    ]  # fmt: skip
    return [str(a) for a in cmd]


def ratio(a, b):
    return None if a is None or b in (None, 0) else round(a / b, 3)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rows", type=int, default=256, help="fixture rows (a multiple of --batch-size)"
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-trl", action="store_true", help="run the mlx-kto side only")
    p.add_argument("--skip-mlx", action="store_true", help="run the TRL side only")
    p.add_argument(
        "--trl-no-precompute",
        action="store_true",
        help="also run TRL without precompute_ref_log_probs (reference forward in every step)",
    )
    p.add_argument(
        "--trl-venv",
        type=Path,
        default=Path(
            os.environ.get("MLX_KTO_BENCH_TRL_VENV", Path.home() / ".cache/mlx_kto_bench/trl-venv")
        ),
    )
    p.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("MLX_KTO_BENCH_DIR", "/tmp/mlx_kto_bench")) / "h2h",
        help="model, data and run folders",
    )
    a = p.parse_args(argv)
    if a.batch_size < 2:
        p.error("--batch-size: KTO needs at least 2 rows per micro-batch")
    if a.rows < a.batch_size or a.rows % a.batch_size:
        p.error(f"--rows: must be a multiple of --batch-size ({a.batch_size}), got {a.rows}")
    if a.epochs < 1:
        p.error("--epochs: must be at least 1")
    if a.skip_trl and a.skip_mlx:
        p.error("--skip-trl and --skip-mlx: nothing left to run")
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from h2h_fixture import check_round_trip, h2h_model, write_fixture

    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    sink = open(run_dir / "h2h.jsonl", "w")
    per_epoch = args.rows // args.batch_size
    n_steps = per_epoch * args.epochs
    warmup = int(0.1 * n_steps)  # mlx-kto's default; given to TRL explicitly
    emit(
        {
            "h2h": "machine",
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "rows": args.rows,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "steps": n_steps,
            "warmup_steps": warmup,
            "lr": args.lr,
            "run_dir": str(run_dir),
        },
        sink,
    )

    py_trl = None if args.skip_trl else trl_python(args.trl_venv)
    py_mlx = sys.executable
    # The mlx side runs this checkout's mlx_kto; the TRL side sees none of the project's paths.
    pythonpath = [str(HERE.parent)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p
    ]
    env_mlx = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath)}
    env_trl = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    note("fixture: model folder and rows")
    model = h2h_model(root)
    data, ids = write_fixture(root, args.rows)
    n_checked = check_round_trip(model, data, ids)
    emit(
        {
            "h2h": "check",
            "what": "mlx-kto tokenization == fixture ids",
            "rows": n_checked,
            "ok": True,
        },
        sink,
    )

    mlx_runner, trl_runner = HERE / "h2h_mlx_runner.py", HERE / "h2h_trl_runner.py"
    if py_trl is not None:
        note("check: HF LlamaForCausalLM logits vs MLX")
        lt, lm = run_dir / "logits_torch.json", run_dir / "logits_mlx.json"
        common = ["--model", model, "--ids", ids]
        run_child(
            "torch logits",
            [py_trl, trl_runner, "logits", "--out", lt, *common],
            run_dir / "logits_torch.log",
            env_trl,
        )
        run_child(
            "mlx logits",
            [py_mlx, mlx_runner, "logits", "--out", lm, *common],
            run_dir / "logits_mlx.log",
            env_mlx,
        )
        a, b = read_json(lt), read_json(lm)
        diff = max(abs(x - y) for ra, rb in zip(a["logits"], b["logits"]) for x, y in zip(ra, rb))
        ok = a["tokens"] == b["tokens"] and diff <= LOGIT_TOL
        emit(
            {
                "h2h": "check",
                "what": "HF vs MLX logits",
                "model": a["class"],
                "tokens": len(a["tokens"]),
                "max_abs_diff": diff,
                "tol": LOGIT_TOL,
                "ok": ok,
            },
            sink,
        )
        if not ok:
            fail(
                f"HF and MLX disagree on the fixture model's logits (max |diff| {diff:.3g} > {LOGIT_TOL})"
            )

    def matmul(when: str) -> dict:
        rates = {}
        for name, py, runner, env in (
            ("torch", py_trl, trl_runner, env_trl),
            ("mlx", py_mlx, mlx_runner, env_mlx),
        ):
            if py is None:
                continue
            out = run_dir / f"matmul_{name}_{when}.json"
            run_child(
                f"{name} matmul",
                [py, runner, "matmul", "--out", out],
                run_dir / f"matmul_{name}_{when}.log",
                env,
            )
            rates[name] = read_json(out)
            emit(
                {
                    "h2h": "matmul",
                    "when": when,
                    "framework": name,
                    "n": 2048,
                    "dtype": "float32",
                    **{k: (r3(v) if isinstance(v, float) else v) for k, v in rates[name].items()},
                },
                sink,
            )
        return rates

    before = matmul("before")
    results = {}
    if not args.skip_mlx:
        note(f"mlx-kto: {n_steps} steps")
        out, adapter = run_dir / "mlx.json", run_dir / "mlx-adapter"
        # A fresh, empty reference cache: epoch 1 pays the reference pass.
        train_args = mlx_train_args(model, data, adapter, run_dir / "mlx-ref-cache", args)
        cmd = [py_mlx, mlx_runner, "train", "--out", out, "--", *train_args]
        proc = run_child("mlx-kto", cmd, run_dir / "mlx.log", env_mlx)
        metrics = [
            json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines() if x.strip()
        ]
        results["mlx"] = summarize_mlx(proc, read_json(out), metrics, per_epoch)
        emit({"h2h": "run", "trainer": "mlx", **results["mlx"]}, sink)

    if py_trl is not None:
        modes = [("trl", True)] + ([("trl_noprecompute", False)] if args.trl_no_precompute else [])
        for name, precompute in modes:
            note(f"{name}: {n_steps} steps")
            out = run_dir / f"{name}.json"
            env = {**env_trl, "HF_HOME": str(run_dir / f"{name}-hf")}  # no cached reference columns
            cmd = [
                py_trl, trl_runner, "train", "--out", out, "--model", model, "--data", data,
                "--ids", ids, "--work", run_dir / f"{name}-out", "--epochs", args.epochs,
                "--batch-size", args.batch_size, "--lr", args.lr, "--warmup-steps", warmup,
                "--beta", 0.1, "--max-length", MAX_LENGTH, "--lora-rank", 8,
                "--lora-alpha", 16, "--seed", args.seed,
            ] + ([] if precompute else ["--no-precompute"])  # fmt: skip
            proc = run_child(name, cmd, run_dir / f"{name}.log", env)
            results[name] = summarize_trl(proc, read_json(out), per_epoch, precompute)
            emit({"h2h": "run", "trainer": name, **results[name]}, sink)

    after = matmul("after")
    flops = warm_step_flops(ids, per_epoch)
    for name, res in results.items():
        framework = "mlx" if name == "mlx" else "torch"
        best = max(r[framework]["gflops"] for r in (before, after) if framework in r)
        step = res.get("warm_step_median_s")
        rate = flops / step / 1e9 if step else None
        emit(
            {
                "h2h": "efficiency",
                "trainer": name,
                "warm_step_gflop": r3(flops / 1e9),
                "warm_step_gflops": r3(rate),
                "matmul_gflops": r3(best),
                "share_of_matmul_rate": r3(rate / best) if rate else None,
            },
            sink,
        )
    if "mlx" in results and "trl" in results:
        m, t = results["mlx"], results["trl"]
        ratios = {
            k: ratio(m[k], t[k])
            for k in (
                "wall_s",
                "ref_pass_s",
                "warm_step_median_s",
                "step_time_median_s",
                "startup_s",
                "loop_s",
                "peak_rss_mb",
            )
        }
        rates = {
            k: [before.get(k, {}).get("gflops"), after.get(k, {}).get("gflops")]
            for k in ("torch", "mlx")
        }
        emit(
            {
                "h2h": "ratios",
                "mlx_over_trl": ratios,
                "matmul_mlx_over_torch": ratio(max(rates["mlx"]), max(rates["torch"])),
                "floors": {
                    "wall_faster": ratios["wall_s"] is not None and ratios["wall_s"] < 1,
                    "warm_step_as_fast": ratios["warm_step_median_s"] is not None
                    and ratios["warm_step_median_s"] <= 1,
                    "peak_rss_at_most_0.6": ratios["peak_rss_mb"] is not None
                    and ratios["peak_rss_mb"] <= 0.6,
                },
            },
            sink,
        )
    note(f"done; JSON lines in {run_dir / 'h2h.jsonl'}")


if __name__ == "__main__":
    main()
