"""Build the demo base model shipped in mlx_kto/demo/assets/ (deterministic, offline).

    .venv/bin/python examples/build_demo_model.py            # rebuild the shipped assets
    .venv/bin/python examples/build_demo_model.py --out /tmp/demo --steps 50   # a quick try

What it makes:
  model/            a tiny Llama (HF format: config.json, float16 model.safetensors,
                    byte-level BPE tokenizer with a chat template) pretrained briefly
                    on the synthetic task of `mlx_kto.demo.task`: every question is
                    answered in a mix of styles, 30% polite, 30% terse, 40% rude, so
                    sampling from it gives a mix of styles.
  data/train.jsonl  unpaired thumbs-up/down feedback on completions drawn from that
                    same mix (polite = thumbs_up), ~30% desirable like real feedback.
  data/valid.jsonl  the same on the held-out questions (never in train.jsonl).
  heldout_prompts.json  the held-out questions the demo samples on.
  manifest.json     build settings, sizes, the style mix measured by sampling the
                    built model, and the sha256 of the weights.

Everything is seeded: the tokenizer, the init, the data order and the feedback
rows. Rebuilding on the same machine gives the same files; on another CPU the
weights may differ in the last bits (floating-point summation order).
Pretraining takes about 4 minutes on a 2-core CPU (600 steps of 64 sequences).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

import mlx_kto  # noqa: F401  (OpenBLAS before mlx.core)
from mlx_kto.demo import task  # noqa: E402
from mlx_kto.demo.sample import prompt_ids, sample_completions, style_shares  # noqa: E402

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from toy import build_tokenizer, model_config  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mlx_kto" / "demo" / "assets"
ARCH = dict(  # ~0.9M parameters: ~1.8 MB in float16
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=256,
)
N_TRAIN_FEEDBACK = 400
N_VALID_FEEDBACK = 96


def encode_pool(tokenizer, n: int, seed: int):
    """n pretraining sequences (chat-formatted question + styled answer + EOS) as
    (tokens, completion_start) pairs, drawn from all questions and the style mix."""
    rng = random.Random(seed)
    qs = task.questions("all")
    prompt_cache: dict[str, list[int]] = {}
    comp_cache: dict[str, list[int]] = {}
    eos = tokenizer.eos_token_id
    out = []
    for _ in range(n):
        q, a = rng.choice(qs)
        text = task.render(a, task.sample_style(rng), rng)
        if q not in prompt_cache:
            prompt_cache[q] = prompt_ids(tokenizer, q)
        if text not in comp_cache:
            # The chat template puts the reply right after <|assistant|> (a special
            # token), so encoding it alone matches the templated conversation.
            comp_cache[text] = tokenizer.encode(text, add_special_tokens=False) + [eos]
        p = prompt_cache[q]
        out.append((p + comp_cache[text], len(p)))
    return out


def make_batches(pool, batch_size: int, pad_to: int):
    """Fixed-shape [B, pad_to] batches: inputs, targets and a completion-target mask."""
    for i in range(0, len(pool) - batch_size + 1, batch_size):
        toks = np.zeros((batch_size, pad_to + 1), dtype=np.int32)  # [B, T+1]
        mask = np.zeros((batch_size, pad_to), dtype=np.float32)  # [B, T]
        for b, (seq, start) in enumerate(pool[i : i + batch_size]):
            seq = seq[: pad_to + 1]
            toks[b, : len(seq)] = seq
            # Target t predicts token t+1: learn the reply (and its EOS), not the question.
            mask[b, start - 1 : len(seq) - 1] = 1.0
        yield mx.array(toks[:, :-1]), mx.array(toks[:, 1:]), mx.array(mask)


def pretrain(model, pool, steps: int, batch_size: int, lr: float, pad_to: int, log=print):
    """Plain next-token cross-entropy on the replies (AdamW, warmup + cosine)."""
    warmup = max(1, steps // 20)
    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, lr, warmup), optim.cosine_decay(lr, steps - warmup, lr * 0.05)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)

    def loss_fn(model, x, y, mask):
        logits = model(x).astype(mx.float32)  # [B, T, V]
        ce = nn.losses.cross_entropy(logits, y)  # [B, T]
        return (ce * mask).sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step_fn(x, y, mask):
        loss, grad = loss_and_grad(model, x, y, mask)
        grad, _ = optim.clip_grad_norm(grad, 1.0)
        opt.update(model, grad)
        return loss

    step_fn = mx.compile(step_fn, inputs=state, outputs=state)
    model.train()
    t0, done, running = time.perf_counter(), 0, None
    while done < steps:
        for x, y, mask in make_batches(pool, batch_size, pad_to):
            loss = step_fn(x, y, mask)
            mx.eval(state, loss)
            done += 1
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            if done % 50 == 0 or done == steps:
                log(
                    f"pretrain step {done}/{steps} loss {running:.3f} ({time.perf_counter() - t0:.0f}s)"
                )
            if done >= steps:
                break
    model.eval()
    return running


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(
    out: Path, steps: int, seed: int, batch_size: int = 64, lr: float = 3e-3, log=print
) -> dict:
    from mlx_lm.utils import _get_classes

    t_start = time.perf_counter()
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    # Repeating the task text makes its words single BPE tokens: short sequences, fast demo.
    hf_tok = build_tokenizer(model_dir, vocab_size=1024, extra_corpus=task.corpus_lines() * 4)
    cfg = model_config("llama", vocab_size=len(hf_tok), **ARCH)
    cfg.update(
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        torch_dtype="float16",
    )
    mx.random.seed(seed)
    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    # Small-normal init (HF initializer_range 0.02) for every matrix; norms stay at 1.
    flat = dict(tree_flatten(model.parameters()))
    for i, k in enumerate(sorted(flat)):
        if flat[k].ndim == 2:
            flat[k] = 0.02 * mx.random.normal(flat[k].shape, key=mx.random.key(seed * 1000 + i))
    model.update(_unflatten(flat))
    mx.eval(model.parameters())
    n_params = sum(v.size for v in flat.values())

    pool = encode_pool(hf_tok, n=steps * batch_size, seed=seed)
    pad_to = max(len(s) for s, _ in pool)
    log(
        f"model: {n_params / 1e6:.2f}M parameters, vocab {len(hf_tok)}, sequences <= {pad_to} tokens"
    )
    final_loss = pretrain(model, pool, steps, batch_size, lr, pad_to, log)

    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(model_dir / "model.safetensors"), weights, metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    # Feedback on completions from the base model's own style mix; valid = held-out questions.
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_rows = task.feedback_rows(task.questions("feedback"), N_TRAIN_FEEDBACK, seed + 1)
    valid_rows = task.feedback_rows(task.questions("heldout"), N_VALID_FEEDBACK, seed + 2)
    write_jsonl(data_dir / "train.jsonl", train_rows)
    write_jsonl(data_dir / "valid.jsonl", valid_rows)
    heldout = [q for q, _ in task.questions("heldout")]
    (out / "heldout_prompts.json").write_text(json.dumps(heldout, indent=1) + "\n")

    # Measure what the shipped (float16) weights actually say.
    model.update(_unflatten({k: v.astype(mx.float32) for k, v in weights.items()}))
    samples = sample_completions(model, hf_tok, heldout, n=16, seed=seed)
    shares = style_shares(samples)
    log(
        "base model style mix on held-out prompts (sampled): "
        + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    )
    manifest = {
        "builder": "examples/build_demo_model.py",
        "seed": seed,
        "pretrain_steps": steps,
        "batch_size": batch_size,
        "learning_rate": lr,
        "final_pretrain_loss": round(final_loss, 4),
        "parameters": n_params,
        "architecture": {"model_type": "llama", "vocab_size": len(hf_tok), **ARCH},
        "style_mix": task.STYLE_MIX,
        "sampled_style_shares": {k: round(v, 4) for k, v in shares.items()},
        "feedback": {
            "train_rows": len(train_rows),
            "train_desirable": sum(r["label"] == "thumbs_up" for r in train_rows),
            "valid_rows": len(valid_rows),
            "valid_desirable": sum(r["label"] == "thumbs_up" for r in valid_rows),
        },
        "heldout_prompts": len(heldout),
        "weights_sha256": hashlib.sha256(
            (model_dir / "model.safetensors").read_bytes()
        ).hexdigest(),
        "build_seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out} in {manifest['build_seconds']:.0f}s")
    return manifest


def _unflatten(flat: dict):
    from mlx.utils import tree_unflatten

    return tree_unflatten(list(flat.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="assets folder to (re)write")
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    if args.steps < 1 or not math.isfinite(args.lr):
        ap.error("--steps must be >= 1")
    build(args.out, args.steps, args.seed, args.batch_size, args.lr)


if __name__ == "__main__":
    main()
