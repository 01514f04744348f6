"""The TRL side of bench/h2h.py: TRL 1.16 KTOTrainer + PEFT LoRA on torch CPU, one process.

Runs in the benchmark's own venv (torch, transformers, peft, trl; see h2h.py), never in the
project's: it imports neither mlx nor mlx_kto. Three modes, each writing one JSON file:

    train   --model DIR --data train.jsonl --ids token_ids.json --out run.json
            [--epochs 3 --batch-size 8 --lr 5e-5 --warmup-steps N --no-precompute]
            [--target-modules all-linear --ids-check report]
            KTOTrainer on the text rows (TRL tokenizes them itself); asserts that the dataset
            TRL prepared holds exactly the fixture's token ids (or, with --ids-check report,
            counts the rows that differ); counts the token positions the model's forwards
            compute and the real (attended) ones; records phase timestamps,
            per-step begin/end times (a TrainerCallback), the reference pass (TRL's own
            `_precompute_ref_logps`, or the in-step reference forwards without precompute)
            and ru_maxrss at each phase.
    logits  --model DIR --ids token_ids.json --out logits.json: HF LlamaForCausalLM's
            logits on the first row's first tokens (h2h.py compares them with MLX's).
    matmul  --out matmul.json: the best-of-5 2048^3 fp32 torch matmul rate.

The timers wrap `_precompute_ref_logps` (a subclass) and the `use_adapter` block that holds
the in-step reference forwards; they change no computation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time

T_START = time.time()

# Offline and quiet: no hub, no telemetry; a fresh datasets cache per run (set by h2h.py)
# so precompute_ref_log_probs never finds an earlier run's reference columns.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def matmul_rate(n: int = 2048, reps: int = 5) -> dict:
    import torch

    a = torch.randn(n, n)  # [n, n]
    b = torch.randn(n, n)  # [n, n]
    a @ b  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return {"gflops": 2 * n**3 / min(times) / 1e9, "threads": torch.get_num_threads()}


def first_row_logits(model_dir: str, ids_path: str, n_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = json.load(open(ids_path))[0]
    tokens = (ids["prompt_ids"] + ids["completion_ids"])[:n_tokens]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]  # [T, vocab]
    return {"class": type(model).__name__, "tokens": tokens, "logits": logits.tolist()}


def train(args) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    rec: dict = {"t_start": T_START, "t_imported": time.time()}
    rec["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl.__version__,
        "datasets": datasets.__version__,
        "python": sys.version.split()[0],
    }
    rec["torch_threads"] = torch.get_num_threads()
    timers = {"precompute_s": 0.0, "ref_in_steps_s": 0.0, "ref_in_steps_calls": 0}
    in_precompute = [False]

    # Without precompute, the reference forwards of a step run inside `use_adapter(...)` (the
    # adapter switched off) in KTOTrainer._compute_loss: time that block, outside precompute.
    import trl.trainer.kto_trainer as kto_module

    use_adapter = getattr(kto_module, "use_adapter", None)

    @contextlib.contextmanager
    def timed_use_adapter(*a, **kw):
        t0 = time.perf_counter()
        with use_adapter(*a, **kw) as ctx:
            yield ctx
        if not in_precompute[0]:
            timers["ref_in_steps_s"] += time.perf_counter() - t0
            timers["ref_in_steps_calls"] += 1

    if use_adapter is not None:
        kto_module.use_adapter = timed_use_adapter
    else:
        timers["ref_in_steps_s"] = None  # this TRL has no such block to time

    class TimedKTOTrainer(KTOTrainer):
        """KTOTrainer with a timer around the reference precompute (nothing else changed)."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            in_precompute[0] = True
            try:
                out = super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                in_precompute[0] = False
            timers["precompute_s"] += time.perf_counter() - t0
            return out

    steps: list[list[float]] = []  # [begin, end] wall times per optimizer step

    class StepTimes(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            steps.append([time.time(), None])

        def on_step_end(self, a, state, control, **kw):
            steps[-1][1] = time.time()

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokens = {"computed": 0, "real": 0, "forwards": 0}

    def count_tokens(module, a, kw):
        """Every forward of the trunk (policy, KL, reference; PEFT calls the outer forward
        directly, the trunk through __call__): positions computed and attended."""
        ids, mask = kw.get("input_ids", a[0] if a else None), kw.get("attention_mask")
        if ids is not None:
            tokens["computed"] += ids.numel()
            tokens["real"] += int(mask.sum()) if mask is not None else ids.numel()
            tokens["forwards"] += 1

    model.model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    rec["attn_implementation"] = model.config._attn_implementation
    rec["t_model_loaded"] = time.time()
    rec["rss_model_loaded_mb"] = maxrss_mb()
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    dataset = datasets.Dataset.from_list(rows)

    config = KTOConfig(
        output_dir=args.work,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=args.beta,
        max_length=args.max_length,
        precompute_ref_log_probs=not args.no_precompute,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    lora = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha,
        target_modules=(
            "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
        ),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = TimedKTOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[StepTimes()],
    )
    rec["t_trainer_built"] = time.time()
    rec["rss_trainer_built_mb"] = maxrss_mb()

    # The same tokens as mlx-kto: TRL's own tokenization must give the fixture's ids, in order.
    want = json.load(open(args.ids))
    ds = trainer.train_dataset
    got_p, got_c, got_l = ds["prompt_ids"], ds["completion_ids"], ds["label"]
    differ = (
        len(want)
        if len(got_p) != len(want)
        else sum(
            list(p) != w["prompt_ids"] or list(c) != w["completion_ids"] or bool(lab) != w["label"]
            for p, c, lab, w in zip(got_p, got_c, got_l, want)
        )
    )
    if differ and args.ids_check == "strict":
        raise SystemExit("h2h_trl_runner: TRL tokenized the rows differently from token_ids.json")
    rec["tokens_checked_rows"] = len(want)
    rec["tokens_rows_differ"] = differ
    rec["trl_row_tokens"] = sum(len(p) + len(c) for p, c in zip(got_p, got_c))
    rec["t_checked"] = time.time()

    trainer.train()
    rec["t_train_end"] = time.time()
    rec["steps"] = steps
    rec.update(timers)
    rec["n_steps"] = trainer.state.global_step
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rec["first_loss"] = logs[0]["loss"] if logs else None
    rec["last_loss"] = logs[-1]["loss"] if logs else None
    rec["rss_end_mb"] = maxrss_mb()
    rec["tokens"] = tokens
    rec["t_end"] = time.time()
    return rec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["train", "logits", "matmul"])
    p.add_argument("--out", required=True)
    p.add_argument("--model")
    p.add_argument("--data")
    p.add_argument("--ids")
    p.add_argument("--work", default="trl-out")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-precompute", action="store_true")
    p.add_argument(
        "--target-modules",
        default="q_proj,k_proj,v_proj,o_proj",
        help="LoRA target modules, comma-separated, or all-linear",
    )
    p.add_argument("--ids-check", choices=["strict", "report"], default="strict")
    p.add_argument("--logit-tokens", type=int, default=8)
    args = p.parse_args(argv)
    if args.mode == "matmul":
        out = matmul_rate()
    elif args.mode == "logits":
        out = first_row_logits(args.model, args.ids, args.logit_tokens)
    else:
        out = train(args)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
