"""What a rounds run keeps on disk, one artefact per finished step, each written atomically:

    OUT/rounds_config.json        the settings (config.py)
    OUT/round-0/heldout.json      the base (or starting adapter) on the held-out prompts
    OUT/round-r/feedback.jsonl    round r's labelled replies, in the chat ratings' format
    OUT/round-r/                  round r's training run: adapter, checkpoints/, metrics.jsonl
    OUT/round-r/train.json        written once round r's training returned
    OUT/round-r/heldout.json      round r's adapter on the held-out prompts
    OUT/rounds.json               one record per measured round (rebuilt from the above)

A file present is a step done: a resumed run reads it instead of doing the step again, so
nothing on disk is sampled or labelled twice. A step in flight leaves no file (temp file +
rename), except training, which resumes through its own checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.data.feedback import read_ratings
from mlx_kto.errors import UserError
from mlx_kto.runtime.atomic import atomic_write_bytes, write_errors, write_json

FEEDBACK, HELDOUT, TRAINED, RECORDS = "feedback.jsonl", "heldout.json", "train.json", "rounds.json"


def round_dir(out: str | Path, r: int) -> Path:
    return Path(out) / f"round-{r}"


def read_json(path: Path) -> dict | None:
    """A finished artefact, or None when the step has not finished (no file)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # only a hand edit gets here (atomic writes)
        raise UserError(
            f"{path}: not valid JSON ({e}); restore or delete it to redo that step"
        ) from None


def write_feedback(path: Path, rows: list[dict]) -> None:
    """All of a round's rating rows at once, atomically (a reader sees none or all)."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    with write_errors(path):
        atomic_write_bytes(path, data)


def feedback_counts(path: Path) -> dict | None:
    """{"rows", "desirable"} of a round's feedback file, or None when it is not written yet."""
    if not path.is_file():
        return None
    rows = read_ratings(path)
    return {"rows": len(rows), "desirable": sum(bool(r["label"]) for r in rows)}


def check_both_classes(path: Path, counts: dict, judge: str) -> None:
    """KTO learns from the contrast: a round whose labels are all one class cannot train."""
    n, up = counts["rows"], counts["desirable"]
    if 0 < up < n:
        return
    which = "desirable" if up == n else "undesirable"
    raise UserError(
        f"{path}: all {n} replies were labelled {which} by {judge}; KTO needs both classes: "
        + ("use a stricter rule, or stop here: the policy already does what it asks"
           if up == n else
           "use a looser rule, more --samples-per-prompt, a higher --temp, or more prompts")
    )  # fmt: skip


def write_artefact(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, doc)


def make_record(r: int, held: dict, counts: dict | None, trained: dict | None) -> dict:
    """Round r's line of rounds.json: held-out share and diversity, its training rows."""
    s = held["summary"]
    rows = counts["rows"] if counts else None
    up = counts["desirable"] if counts else None
    return {
        "round": r,
        "adapter": held["adapter"],
        "heldout_share": held["share"],
        "heldout_replies": sum(len(x) for x in held["labels"]),
        "rows": rows,
        "desirable": up,
        "train_share": up / rows if rows else None,
        "distinct_1": s["distinct_1"],
        "distinct_2": s["distinct_2"],
        "self_bleu": s["self_bleu"],
        "entropy": s.get("entropy"),
        "length": s.get("length"),
        "collapse": held["collapse"],
        "steps": trained["steps"] if trained else None,
        "loss": trained["loss"] if trained else None,
        "train_seconds": trained["seconds"] if trained else None,
        "stop": None,
    }


def stop_reason(records: list[dict], min_gain: float, last_round: int) -> str | None:
    """Why to stop after the last record (None: go on). Collapse first, then no gain."""
    last, prev = records[-1], records[-2]
    r = last["round"]
    if last["collapse"]:
        return f"diversity collapsed in round {r} ({'; '.join(last['collapse'])})"
    gain = 100 * (last["heldout_share"] - prev["heldout_share"])
    if gain <= min_gain:
        return (f"the held-out desirable share stopped rising in round {r} "
                f"({prev['heldout_share']:.1%} -> {last['heldout_share']:.1%}, "
                f"gain {gain:+.1f} points <= --min-gain {min_gain:g})")  # fmt: skip
    if last["heldout_share"] >= 1.0 and r < last_round:
        return f"every held-out reply of round {r} is desirable: nothing left to raise"
    return None


def best_round(records: list[dict]) -> dict:
    """The record with the highest held-out share among those that did not collapse
    (the earliest on a tie: less drift from the base for the same share)."""
    ok = [x for x in records if not x["collapse"]] or records[:1]
    return max(ok, key=lambda x: (x["heldout_share"], -x["round"]))
