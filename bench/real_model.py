"""A real model: KTO steps (cold and warm reference) vs an mlx-lm LoRA SFT step on SmolLM2.

    .venv/bin/python bench/real_model.py [--gguf PATH] [--rows 12] [--batch-size 4]

SmolLM2-135M-Instruct from its Q4_1 GGUF (`bash .ci/fetch_smollm2.sh`), loaded the way
`mlx-kto train --model file.gguf` loads it (mlx_kto.model.load.load_base: Q4_1/Q8_0 kept
quantized, float32 compute on the CPU, quantized layers through BLAS). The rows are
conversational (a user question, an assistant reply of a few sentences) rendered by SmolLM2's
own ChatML template, as `train` tokenizes them. The three steps, their interleaved timing and
the JSON lines are bench/throughput.py's (`measure`): one process, the same rows and LoRA
(rank 8 on q,k,v,o of all 30 blocks) for all three; median over the timed batches after a
warm-up pass. Both models multiply through the same kernels, so the ratio is the trainers'.

Floor (issue 16): warm KTO <= 1.2 x SFT x 3/2 -- a warm KTO step does 3 forward-equivalents
(forward + backward on the main sequences, the KL forward) to SFT's 2, with 20% slack --
i.e. warm/SFT <= 1.8 (per-batch median ratio).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx_kto  # noqa: E402,F401  (OpenBLAS before mlx.core)
from mlx_kto.data.rows import examples_from_rows  # noqa: E402
from mlx_kto.data.tokenize import assign_kl_partners, tokenize_examples  # noqa: E402
from mlx_kto.demo.real import smollm2_gguf  # noqa: E402
from mlx_kto.model.gguf_tokenizer import load_gguf_tokenizer  # noqa: E402
from mlx_kto.runtime import fastops  # noqa: E402

from throughput import common_args, measure  # noqa: E402

MAX_LENGTH = 256
FLOOR = 1.2 * 3 / 2  # warm KTO / SFT
QUESTIONS = [
    "Why is the sky blue?", "How do plants make their food?", "What causes the seasons?",
    "How does a refrigerator keep food cold?", "Why do we need sleep?",
    "What is the difference between weather and climate?", "How do vaccines work?",
    "Why does ice float on water?", "How do bees find flowers?", "What makes a rainbow?",
    "How does a bicycle stay upright?", "Why do leaves change color in autumn?",
]  # fmt: skip
SENTENCES = [
    "Sunlight is made of many colors, and the air scatters the short blue waves the most.",
    "Plants use light, water and carbon dioxide to build sugars in their leaves.",
    "The tilt of the Earth's axis changes how directly the sun shines on each half.",
    "A pump moves a fluid that takes heat from inside the box and releases it outside.",
    "While we sleep, the brain sorts memories and the body repairs its tissues.",
    "Weather is what happens today; climate is the pattern over many years.",
    "A vaccine shows the immune system a harmless piece of a germ so it learns to fight it.",
    "Water expands as it freezes, so ice is less dense than the liquid around it.",
    "Bees see ultraviolet patterns on petals and remember the way back to good flowers.",
    "Each raindrop bends and reflects light, splitting it into its colors.",
    "Steering and the shape of the fork keep the wheels under the rider's weight.",
    "In autumn trees stop making green chlorophyll, and yellow and red pigments show.",
    "I hope this helps, and feel free to ask if you want more detail.",
    "Scientists have studied this for a long time, and the basic idea is well understood.",
    "In short, it comes down to simple physics that you can see every day.",
    "You can try a small experiment at home to see it for yourself.",
]  # fmt: skip


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """n conversational rows: a question, a reply of 4-7 sentences; labels alternate."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        reply = " ".join(rng.sample(SENTENCES, rng.randint(4, 7)))
        rows.append({"prompt": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                     "completion": [{"role": "assistant", "content": reply}],
                     "label": i % 2 == 0})  # fmt: skip
    return rows


def tokenized_rows(gguf: Path, n: int, seed: int):
    """The rows as `train` tokenizes them (the GGUF's tokenizer and chat template)."""
    tok = load_gguf_tokenizer(gguf)
    raw = [(r, f"real[{i}]") for i, r in enumerate(chat_rows(n, seed))]
    rows, _ = tokenize_examples(examples_from_rows(raw, "real", seed), tok, MAX_LENGTH)
    assign_kl_partners(rows, seed=seed, max_length=MAX_LENGTH)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", help="the SmolLM2 GGUF (default: the test assets' copy)")
    common_args(ap, rows=12, batch_size=4)
    args = ap.parse_args()
    args.baseline = False  # measure() builds today's trainer

    gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
    rows = tokenized_rows(gguf, args.rows, args.seed)
    results, run = measure(gguf, rows, args, MAX_LENGTH)
    for r in results.values():
        print(json.dumps({**r, "bench": "real_model"}))
    ratio = run["warm_over_sft"]
    summary = {
        "bench": "real_model_summary",
        "model": gguf.name,
        "rows": len(rows),
        "batch_size": args.batch_size,
        "mean_tokens_per_row": round(sum(len(r.tokens) for r in rows) / len(rows), 1),
        "fast_exp": fastops.wanted(),
        **run,
        "floor": f"warm_over_sft <= {FLOOR:.1f} (1.2 x SFT x 3/2)",
        "floor_met": ratio <= FLOOR,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
