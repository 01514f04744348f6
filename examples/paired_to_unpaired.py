"""Turn paired preferences (prompt / chosen / rejected) into unpaired KTO feedback.

    python examples/paired_to_unpaired.py examples/data/paired_preferences.jsonl unpaired.jsonl
    python examples/paired_to_unpaired.py pairs.jsonl unpaired.jsonl --keep-rejected 0.5

You do not need this to train: `mlx-kto train --data pairs.jsonl` unpairs on the
fly, exactly like this script (each pair -> one desirable row with `chosen`, one
undesirable row with `rejected`, then a seeded shuffle so micro-batches mix labels;
TRL's `unpair_preference_dataset` does the same). Convert when you want to look at
or edit the rows, mix them with thumbs-up/down logs, or make the data imbalanced on
purpose: KTO does not need pairs, and the paper shows it still works after
dropping most of the undesirable half (`--keep-rejected 0.1`). Rows without a
`prompt` get the longest common prefix of chosen/rejected as their prompt.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import mlx_kto  # noqa: F401
from mlx_kto.data.rows import load_examples
from mlx_kto.errors import UserError


def unpair(src: str | Path, keep_rejected: float = 1.0, seed: int = 0) -> list[dict]:
    """Unpaired rows {"prompt", "completion", "label"} from a paired (or mixed) file,
    keeping a random `keep_rejected` share of the undesirable rows."""
    rng = random.Random(seed)
    rows = []
    for ex in load_examples(src, seed=seed):  # validates, unpairs and shuffles
        if not ex.label and rng.random() >= keep_rejected:
            continue
        row = {"prompt": ex.prompt, "completion": ex.completion, "label": ex.label}
        if ex.tools is not None:
            row["tools"] = ex.tools
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="paired .jsonl/.json file")
    ap.add_argument("dst", help="output .jsonl (unpaired prompt/completion/label rows)")
    ap.add_argument(
        "--keep-rejected",
        type=float,
        default=1.0,
        help="share of undesirable rows to keep (1.0 = all)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        rows = unpair(args.src, args.keep_rejected, args.seed)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    Path(args.dst).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    n_up = sum(r["label"] for r in rows)
    print(f"wrote {len(rows)} rows to {args.dst}: {n_up} desirable, {len(rows) - n_up} undesirable")


if __name__ == "__main__":
    main()
