"""The mlx-kto side of bench/h2h.py, one process in the project's venv. Three modes:

    train  --out run.json -- ARGS...   `python -m mlx_kto.train ARGS...` in this process (the
           same entry point), plus the wall time of each metrics.jsonl write (the end of
           each step), ru_maxrss, and the token positions the policy and reference passes
           computed against the real ones (padding share); h2h.py reads the per-step
           figures from metrics.jsonl.
    logits --model DIR --ids token_ids.json --out logits.json: the model's logits (as
           mlx_lm.load builds it) on the first row's first tokens.
    matmul --out matmul.json: the best-of-5 2048^3 fp32 matmul rate (MLX + the BLAS
           mlx_kto loads).

The hooks wrap MetricsLog.write, the step's batch builder and the reference forwards to
count; the training itself is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

T_START = time.time()

import mlx_kto  # noqa: E402  (OpenBLAS before mlx.core)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(obj))
    os.replace(tmp, path)


def matmul_rate(n: int = 2048, reps: int = 5) -> dict:
    import mlx.core as mx

    a = mx.random.normal((n, n))  # [n, n]
    b = mx.random.normal((n, n))  # [n, n]
    mx.eval(a, b, a @ b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - t0)
    return {
        "gflops": 2 * n**3 / min(times) / 1e9,
        "blas": mlx_kto.runtime.blas.loaded,
        "mlx": mx.__version__,
    }


def first_row_logits(model_dir: str, ids_path: str, n_tokens: int) -> dict:
    import mlx.core as mx
    from mlx_lm.utils import load_model

    ids = json.loads(Path(ids_path).read_text())[0]
    tokens = (ids["prompt_ids"] + ids["completion_ids"])[:n_tokens]
    model, _ = load_model(Path(model_dir))
    logits = model(mx.array([tokens]))[0].astype(mx.float32)  # [T, vocab]
    return {"class": type(model).__module__, "tokens": tokens, "logits": logits.tolist()}


def _count_tokens(counts: dict) -> None:
    """Count computed and real token positions of the policy's passes (each micro-batch's
    main and KL sequences, padded or packed) and of the reference forwards."""
    from mlx_kto.data.packing import pack_passes, passes_computed
    from mlx_kto.reference import scorer
    from mlx_kto.runtime.streams import active_streams
    from mlx_kto.train import step

    import numpy as np

    make_batch = step.make_batch

    def counted_batch(rows, index, *a, **kw):
        batch = make_batch(rows, index, *a, **kw)
        kl = batch.kl_tokens is not None
        counts["policy_real"] += sum(
            len(rows[i].tokens) + (len(rows[i].kl_tokens) if kl else 0) for i in index
        )
        counts["policy_computed"] += batch.computed
        return batch

    ref_forward, ref_packed = scorer.reference_forward, scorer.reference_packed_forward

    def counted_ref(model, tokens, mask, *a, **kw):
        counts["ref_computed"] += tokens.size
        m = np.array(mask)  # a row's real tokens end with its completion
        counts["ref_real"] += sum(int(np.flatnonzero(r)[-1]) + 1 for r in m if r.any())
        return ref_forward(model, tokens, mask, *a, **kw)

    def counted_packed(model, seqs, starts, frozen=None, forward=None, pass_tokens=0):
        counts["ref_real"] += sum(len(s) for s in seqs)
        groups = max(1, active_streams())  # as the scorer packs them
        passes = pack_passes([list(s) for s in seqs], starts, groups=groups, budget=pass_tokens)
        counts["ref_computed"] += passes_computed(passes)
        return ref_packed(model, seqs, starts, frozen, forward, pass_tokens)

    step.make_batch = counted_batch
    scorer.reference_forward, scorer.reference_packed_forward = counted_ref, counted_packed


def train(train_args: list[str]) -> dict:
    from mlx_kto.cli.app import run as run_cli
    from mlx_kto.cli.train import train_command
    from mlx_kto.runtime import torchless
    from mlx_kto.train import loop as trainer

    torchless.keep_out()  # as `python -m mlx_kto.train` does
    rec: dict = {"t_start": T_START, "t_imported": time.time()}
    stamps: list[float] = []
    write = trainer.MetricsLog.write

    def stamped_write(self, record):
        stamps.append(time.time())
        write(self, record)

    trainer.MetricsLog.write = stamped_write
    counts = dict.fromkeys(("policy_real", "policy_computed", "ref_real", "ref_computed"), 0)
    _count_tokens(counts)
    code = 0
    try:
        torchless.keep_out()  # as `python -m mlx_kto.train` does
        run_cli(train_command, train_args, "python -m mlx_kto.train")
    except SystemExit as e:  # the CLI exits on a user error
        code = e.code if isinstance(e.code, int) else 1
    rec.update(step_end_times=stamps, exit_code=code, rss_end_mb=maxrss_mb(), t_end=time.time())
    rec["tokens"] = counts
    return rec


def main() -> None:
    argv = sys.argv[1:]
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["train", "logits", "matmul"])
    p.add_argument("--out", required=True)
    p.add_argument("--model")
    p.add_argument("--ids")
    p.add_argument("--logit-tokens", type=int, default=8)
    args = p.parse_args(argv)
    if args.mode == "matmul":
        out = matmul_rate()
    elif args.mode == "logits":
        out = first_row_logits(args.model, args.ids, args.logit_tokens)
    else:
        out = train(train_args)
    write_json(args.out, out)
    if out.get("exit_code"):
        sys.exit(out["exit_code"])


if __name__ == "__main__":
    main()
