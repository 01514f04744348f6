"""Write a small paired preference set for the KTO-vs-DPO recipe (deterministic, offline).

    python examples/kto_vs_dpo/make_pairs.py OUT_DIR [--n 240]

OUT_DIR/train.jsonl and OUT_DIR/valid.jsonl hold prompt/chosen/rejected rows on the demo task
(mlx_kto.demo.task): chosen is the polite answer, rejected a rude or terse one with the same
content, so the only thing to learn is the style. valid.jsonl uses the held-out questions.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from mlx_kto.demo.task import questions, render


def pair_rows(split: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    qs = questions(split)
    rows = []
    for _ in range(n):
        prompt, answer = rng.choice(qs)
        rows.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": render(answer, "polite", rng)}],
                "rejected": [
                    {
                        "role": "assistant",
                        "content": render(answer, rng.choice(["rude", "terse"]), rng),
                    }
                ],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=240, help="Training pairs (valid: n / 4).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, split, n, seed in (
        ("train", "feedback", args.n, args.seed),
        ("valid", "heldout", max(args.n // 4, 4), args.seed + 1),
    ):
        path = args.out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")  # atomic: never a half-written file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(split, n, seed)))
        tmp.replace(path)
        print(f"{path}: {n} pairs")


if __name__ == "__main__":
    main()
