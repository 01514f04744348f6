"""Real model, real lengths: mlx-kto vs TRL 1.16 KTOTrainer + PEFT on SmolLM2-135M-Instruct.

    .venv/bin/python bench/real_h2h.py            # the full run: 120 rows, 2 epochs (~1 h)
    .venv/bin/python bench/real_h2h.py --quick    # every phase on 16 short rows, 1 epoch
    options: --rows 120 --epochs 2 --batch-size 8 --max-tokens 512 --lr 5e-5 --seed 0
             --gguf FILE | --hf DIR   the model (default: SmolLM2's GGUF, MLX_KTO_TEST_ASSETS)
             --no-packing             the mlx-kto side pads (for a before/after of packing)
             --pass-tokens N, --grad-checkpoint   the mlx-kto side's memory options
             --skip-trl / --skip-mlx, --trl-venv DIR, --root DIR   as bench/h2h.py

The model: SmolLM2-135M-Instruct in float32 (30 blocks, 49k vocabulary, tied head), an HF
folder both trainers load (made once from the Q4_1 GGUF, dequantized; HF's logits on a chat
prompt must match MLX's to 1e-3). The data: a seeded chat set (user turn, assistant reply,
thumbs up or down at random) whose prompt and completion lengths in tokens follow log-normal
distributions (medians 60 and 120 tokens, sigma 0.8; --quick: 20 and 30), each row at most
--max-tokens after the chat template, as real feedback is; both trainers see the same rows.

Both trainers, each a fresh process, one after the other, from bench/h2h.py's runners:
micro-batch 8, max_length = --max-tokens, LoRA r 8 / alpha 16 on every linear layer of every
block, beta 0.1, AdamW lr 5e-5, cosine after a 10% warmup, grad clip 1.0, seed 0, no eval.
mlx-kto runs with a fresh reference cache (epoch 1 pays the reference pass: cold; epoch 2 is
warm); TRL with precompute_ref_log_probs (its reference pass before the first step).

JSON lines on stdout (and RUN_DIR/real_h2h.jsonl): the machine; the checks; the fp32 2048^3
matmul rate of torch and of MLX before and after the trainers; per trainer: wall_s (spawn to
exit), real_tokens_per_s (the rows' prompt + completion tokens x epochs over wall_s), the
padding share of the token positions its forwards computed (policy, KL and reference passes),
epoch_s (each epoch's steps), ref_pass_s, peak_rss_mb (ru_maxrss from wait4); and the
mlx / trl ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from h2h import (  # noqa: E402  # noqa: E402
    emit,
    fail,
    note,
    r3,
    ratio,
    read_json,
    run_child,
    summarize_mlx,
    summarize_trl,
    trl_python,
)

LOGIT_TOL = 1e-3
TEMPLATE_TOKENS = 40  # room left for SmolLM2's chat template around a prompt and a reply
WORDS = (
    "the a light water air sun tree leaf river stone cloud rain wind bird song city road "
    "house door window book story time day night year people child friend family heart mind "
    "question answer reason idea plan work school garden kitchen table bread tea coffee fruit "
    "blue green red warm cold quick slow bright quiet gentle strong small large old new "
    "because when while after before although and but so then also often never always "
    "explain describe help remember think learn grow build carry follow open close move "
    "how why what where which could would should might must will can does makes keeps"
).split()


def hf_model(args, root: Path) -> Path:
    """The float32 HF folder both trainers load: --hf, or made once from the GGUF."""
    if args.hf:
        return Path(args.hf)
    import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
    from mlx_kto.demo.real import smollm2_gguf
    from mlx_kto.export.gguf_base import gguf_to_mlx

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model

    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    out = root / f"{gguf.stem}-hf-f32"
    if (out / "model.safetensors").exists():
        return out
    note(f"model: {gguf.name} -> float32 HF folder {out}")
    tmp = gguf_to_mlx(gguf, root / "gguf-mlx.tmp", dtype="float32", overwrite=True, log=note)
    model, _ = load_model(tmp)
    weights = {
        k: v.astype(mx.float32) for k, v in tree_flatten(dequantize_model(model).parameters())
    }
    staging = root / "hf.tmp"
    staging.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "pt"})
    config = json.loads((tmp / "config.json").read_text())
    for key in ("quantization", "quantization_config", "gguf_source"):
        config.pop(key, None)
    (staging / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}))
    for f in tmp.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copyfile(f, staging / f.name)
    shutil.rmtree(tmp)
    staging.rename(out)
    return out


def _text(rng: random.Random, tokenizer, n_tokens: int) -> str:
    """Words at random, cut to n_tokens tokens or just under (sentences of 6-14 words)."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < n_tokens:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        words += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."]
    while (
        len(words) > 1
        and len(tokenizer.encode(" ".join(words), add_special_tokens=False)) > n_tokens
    ):
        words.pop()
    return " ".join(words)


def chat_rows(tokenizer, n: int, max_tokens: int, seed: int = 0, quick: bool = False) -> list:
    """The seeded chat set (see the module docstring), as conversational rows."""
    rng = random.Random(seed)
    mu_p, mu_c = (20, 30) if quick else (60, 120)
    budget = max_tokens - TEMPLATE_TOKENS
    rows = []
    for _ in range(n):
        n_p = max(4, min(budget - 4, round(rng.lognormvariate(math.log(mu_p), 0.8))))
        n_c = max(2, min(budget - n_p, round(rng.lognormvariate(math.log(mu_c), 0.8))))
        rows.append(
            {
                "prompt": [{"role": "user", "content": _text(rng, tokenizer, n_p)}],
                "completion": [{"role": "assistant", "content": _text(rng, tokenizer, n_c)}],
                "label": rng.random() < 0.5,
            }
        )
    return rows


def write_rows(path: Path, model: Path, args) -> list[dict]:
    """`chat_rows` with the model's tokenizer, written as train.jsonl."""
    from mlx_lm.utils import load_tokenizer

    rows = chat_rows(load_tokenizer(model), args.rows, args.max_tokens, args.seed, args.quick)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def mlx_ids(model: Path, data: Path, ids: Path, args) -> dict:
    """Tokenize the rows the way `mlx-kto train` does (in file order); write token_ids.json
    for the TRL side's check. Returns the lengths."""
    import mlx_kto  # noqa: F401
    from mlx_kto.data.rows import load_splits
    from mlx_kto.data.tokenize import tokenize_examples

    from mlx_lm.utils import load_tokenizer

    examples = load_splits(str(data), seed=args.seed)["train"]
    rows, stats = tokenize_examples(examples, load_tokenizer(model), max_length=args.max_tokens)
    if stats.n_truncated or stats.n_dropped_long_prompt or len(rows) != args.rows:
        fail(f"rows were truncated or dropped at --max-tokens {args.max_tokens}: {stats.lines()}")
    out = [
        {"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids, "label": r.label}
        for r in rows
    ]
    ids.write_text(json.dumps(out))
    lp, lc = [len(r.prompt_ids) for r in rows], [len(r.completion_ids) for r in rows]
    return {"row_tokens": sum(lp) + sum(lc), "prompt_median": sorted(lp)[len(lp) // 2],
            "completion_median": sorted(lc)[len(lc) // 2], "longest": max(map(sum, zip(lp, lc)))}  # fmt: skip


def epoch_times(ends: list[float], start: float, per_epoch: int) -> list[float]:
    """Seconds of each epoch's steps, from the wall times at which steps ended."""
    marks = [start] + [ends[(e + 1) * per_epoch - 1] for e in range(len(ends) // per_epoch)]
    return [r3(b - a) for a, b in zip(marks, marks[1:])]


def padding(tokens: dict, keys: tuple[str, str]) -> dict:
    real, computed = tokens[keys[0]], tokens[keys[1]]
    return {"tokens_real": real, "tokens_computed": computed,
            "padding_share": r3(1 - real / computed) if computed else None}  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 rows of up to 128 tokens, 1 epoch")
    p.add_argument("--rows", type=int, default=None, help="chat rows (default 120; --quick 16)")
    p.add_argument("--epochs", type=int, default=None, help="default 2; --quick 1")
    p.add_argument("--max-tokens", type=int, default=None, help="default 512; --quick 128")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", default=None, help="SmolLM2 GGUF (default: the test asset)")
    p.add_argument("--hf", default=None, help="an HF folder to use instead of the GGUF")
    p.add_argument("--no-packing", action="store_true", help="the mlx-kto side pads")
    p.add_argument("--pass-tokens", type=int, default=None, help="mlx-kto's --pass-tokens")
    p.add_argument("--grad-checkpoint", action="store_true", help="mlx-kto's --grad-checkpoint")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-mlx", action="store_true")
    p.add_argument("--trl-venv", type=Path, default=Path(os.environ.get(
        "MLX_KTO_BENCH_TRL_VENV", Path.home() / ".cache/mlx_kto_bench/trl-venv")))  # fmt: skip
    p.add_argument("--root", type=Path, default=Path(os.environ.get(
        "MLX_KTO_BENCH_DIR", "/tmp/mlx_kto_bench")) / "real_h2h")  # fmt: skip
    a = p.parse_args(argv)
    a.rows = a.rows or (16 if a.quick else 120)
    a.epochs = a.epochs or (1 if a.quick else 2)
    a.max_tokens = a.max_tokens or (128 if a.quick else 512)
    if a.rows % a.batch_size:
        p.error(f"--rows: a multiple of --batch-size ({a.batch_size}), got {a.rows}")
    return a


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = args.root
    run_dir = root / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    sink = open(run_dir / "real_h2h.jsonl", "w")
    per_epoch = args.rows // args.batch_size
    n_steps, warmup = per_epoch * args.epochs, int(0.1 * per_epoch * args.epochs)
    emit({"real_h2h": "machine", "platform": platform.platform(), "cpus": os.cpu_count(),
          "load_avg_1m": round(os.getloadavg()[0], 2), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
          "quick": args.quick, "rows": args.rows, "epochs": args.epochs, "max_tokens": args.max_tokens,
          "batch_size": args.batch_size, "steps": n_steps, "packing": not args.no_packing,
          "grad_checkpoint": args.grad_checkpoint, "run_dir": str(run_dir)}, sink)  # fmt: skip

    py_trl = None if args.skip_trl else trl_python(args.trl_venv)
    py_mlx = sys.executable
    env_mlx = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}  # fmt: skip
    env_trl = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    model = hf_model(args, root)
    data, ids = run_dir / "train.jsonl", run_dir / "token_ids.json"
    write_rows(data, model, args)
    lengths = mlx_ids(model, data, ids, args)
    emit({"real_h2h": "data", "model": str(model), **lengths}, sink)

    mlx_runner, trl_runner = HERE / "h2h_mlx_runner.py", HERE / "h2h_trl_runner.py"
    if py_trl is not None:
        note("check: HF vs MLX logits on the first row")
        lt, lm = run_dir / "logits_torch.json", run_dir / "logits_mlx.json"
        common = ["--model", model, "--ids", ids]
        run_child("torch logits", [py_trl, trl_runner, "logits", "--out", lt, *common],
                  run_dir / "logits_torch.log", env_trl)  # fmt: skip
        run_child("mlx logits", [py_mlx, mlx_runner, "logits", "--out", lm, *common],
                  run_dir / "logits_mlx.log", env_mlx)  # fmt: skip
        a, b = read_json(lt), read_json(lm)
        diff = max(abs(x - y) for ra, rb in zip(a["logits"], b["logits"]) for x, y in zip(ra, rb))
        emit({"real_h2h": "check", "what": "HF vs MLX logits", "max_abs_diff": diff,
              "tol": LOGIT_TOL, "ok": diff <= LOGIT_TOL}, sink)  # fmt: skip
        if diff > LOGIT_TOL:
            fail(f"HF and MLX disagree on the model's logits (max |diff| {diff:.3g})")

    def matmul(when: str) -> dict:
        rates = {}
        for name, py, runner, env in (("torch", py_trl, trl_runner, env_trl),
                                      ("mlx", py_mlx, mlx_runner, env_mlx)):  # fmt: skip
            if py is None:
                continue
            out = run_dir / f"matmul_{name}_{when}.json"
            run_child(f"{name} matmul", [py, runner, "matmul", "--out", out],
                      run_dir / f"matmul_{name}_{when}.log", env)  # fmt: skip
            rates[name] = read_json(out)["gflops"]
            emit(
                {"real_h2h": "matmul", "when": when, "framework": name, "gflops": r3(rates[name])},
                sink,
            )
        return rates

    before = matmul("before")
    results = {}
    row_tokens = lengths["row_tokens"] * args.epochs
    if not args.skip_mlx:
        note(f"mlx-kto: {n_steps} steps")
        out, adapter = run_dir / "mlx.json", run_dir / "mlx-adapter"
        train_args = [
            "--model", model, "--data", data, "--adapter-path", adapter,
            "--ref-cache", run_dir / "mlx-ref-cache", "--epochs", args.epochs,
            "--batch-size", args.batch_size, "--learning-rate", args.lr, "--lr-schedule", "cosine",
            "--warmup-steps", warmup, "--beta", 0.1, "--max-length", args.max_tokens,
            "--lora-rank", 8, "--lora-alpha", 16, "--seed", args.seed, "--steps-per-eval", 0,
            "--quiet", "--no-packing" if args.no_packing else "--packing",
        ]  # fmt: skip
        if args.pass_tokens is not None:
            train_args += ["--pass-tokens", args.pass_tokens]
        if args.grad_checkpoint:
            train_args += ["--grad-checkpoint"]
        proc = run_child("mlx-kto", [py_mlx, mlx_runner, "train", "--out", out, "--", *train_args],
                         run_dir / "mlx.log", env_mlx)  # fmt: skip
        rec = read_json(out)
        metrics = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines() if x]
        res = summarize_mlx(proc, rec, metrics, per_epoch)
        ends = rec["step_end_times"]
        res["epoch_s"] = epoch_times(ends, ends[0] - metrics[0]["step_time"], per_epoch)
        tok = rec["tokens"]
        both = {"real": tok["policy_real"] + tok["ref_real"],
                "computed": tok["policy_computed"] + tok["ref_computed"]}  # fmt: skip
        res |= padding(both, ("real", "computed"))
        res["policy_padding_share"] = padding(tok, ("policy_real", "policy_computed"))[
            "padding_share"
        ]
        res["ref_padding_share"] = padding(tok, ("ref_real", "ref_computed"))["padding_share"]
        results["mlx"] = res
    if py_trl is not None:
        note(f"trl: {n_steps} steps")
        out = run_dir / "trl.json"
        env = {**env_trl, "HF_HOME": str(run_dir / "trl-hf")}  # no cached reference columns
        cmd = [
            py_trl, trl_runner, "train", "--out", out, "--model", model, "--data", data,
            "--ids", ids, "--ids-check", "report", "--work", run_dir / "trl-out",
            "--epochs", args.epochs, "--batch-size", args.batch_size, "--lr", args.lr,
            "--warmup-steps", warmup, "--beta", 0.1, "--max-length", args.max_tokens,
            "--lora-rank", 8, "--lora-alpha", 16, "--seed", args.seed,
            "--target-modules", "all-linear",
        ]  # fmt: skip
        proc = run_child("trl", cmd, run_dir / "trl.log", env)
        rec = read_json(out)
        res = summarize_trl(proc, rec, per_epoch, True)
        ends = [e for _, e in rec["steps"]]
        res["epoch_s"] = epoch_times(ends, rec["steps"][0][0], per_epoch)
        res |= padding(rec["tokens"], ("real", "computed"))
        res["rows_tokenized_differently"] = rec["tokens_rows_differ"]
        results["trl"] = res
    after = matmul("after")
    for name, res in results.items():
        fw = "mlx" if name == "mlx" else "torch"
        res["real_tokens_per_s"] = r3(row_tokens / res["wall_s"])
        res["matmul_gflops"] = r3(max(r[fw] for r in (before, after) if fw in r))
        emit({"real_h2h": "run", "trainer": name, **res}, sink)
    if len(results) == 2:
        m, t = results["mlx"], results["trl"]
        emit({"real_h2h": "ratio", "speedup_wall": ratio(t["wall_s"], m["wall_s"]),
              "rss_mlx_over_trl": ratio(m["peak_rss_mb"], t["peak_rss_mb"]),
              "floors": {"speedup_wall": 2.0, "padding_share": 0.05, "rss_mlx_over_trl": 0.6}}, sink)  # fmt: skip
    note(f"results in {run_dir}")


if __name__ == "__main__":
    main()
