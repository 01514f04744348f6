"""The rounds table (stdout) and OUT/rounds.png: the held-out desirable share and the
diversity of the held-out replies, round by round (round 0 = the starting model)."""

from __future__ import annotations

import os
from pathlib import Path

from mlx_kto.judge.files import atomic_write

COLUMNS = (  # (header, width, cell)
    ("round", 5, lambda x: str(x["round"])),
    ("rows", 5, lambda x: "-" if x["rows"] is None else str(x["rows"])),
    ("desirable", 12, lambda x: "-" if x["rows"] is None
        else f"{x['desirable']} ({x['train_share']:.0%})"),
    ("held-out share", 14, lambda x: f"{x['heldout_share']:.1%}"),
    ("distinct-2", 10, lambda x: f"{x['distinct_2']:.3f}"),
    ("self-BLEU", 9, lambda x: "-" if x["self_bleu"] is None else f"{x['self_bleu']:.3f}"),
    ("entropy", 7, lambda x: "-" if x["entropy"] is None else f"{x['entropy']:.3f}"),
    ("adapter", 0, lambda x: short_path(x["adapter"]) if x["adapter"] else "(base)"),
)  # fmt: skip


def short_path(path: str) -> str:
    """A path relative to the working folder when that is shorter."""
    rel = os.path.relpath(path)
    return rel if len(rel) < len(path) else path


def table(records: list[dict]) -> list[str]:
    """One line per round; `rows` / `desirable` are the replies that round trained on."""

    def line(cells):
        return "  ".join(c.rjust(w) if w else c for c, (_, w, _) in zip(cells, COLUMNS)).rstrip()

    out = [line([h for h, _, _ in COLUMNS]), line(["-" * max(w, len(h)) for h, w, _ in COLUMNS])]
    return out + [line([cell(x) for _, _, cell in COLUMNS]) for x in records]


def plot(records: list[dict], png: str | Path) -> Path | None:
    """rounds.png; None when matplotlib is not installed."""
    try:  # slow to import (~1 s): only when a plot is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rounds = [x["round"] for x in records]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(rounds, [100 * x["heldout_share"] for x in records], "o-", color="C0")
    a.set_title("held-out desirable share (%)", fontsize=10)
    a.set_ylim(0, 100)
    for key, label in (("distinct_2", "distinct-2"), ("self_bleu", "self-BLEU")):
        ys = [x[key] for x in records]
        b.plot([r for r, y in zip(rounds, ys) if y is not None],
               [y for y in ys if y is not None], "o-", label=label)  # fmt: skip
    b.set_title("diversity of held-out replies", fontsize=10)
    b.set_ylim(0, 1)
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.set_xlabel("round (0 = start)")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
