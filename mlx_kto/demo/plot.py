"""A PNG of loss / rewards / kl over steps from a metrics.jsonl (matplotlib optional)."""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.atomic import atomic_write_with

PANELS = (  # (title, [(metrics key, label)])
    ("KTO loss", [("loss", "train"), ("eval/loss", "eval")]),
    (
        "implied rewards  r = beta * log(pi / pi_ref)",
        [
            ("rewards/chosen", "desirable"),
            ("rewards/rejected", "undesirable"),
            ("rewards/margins", "margin"),
            ("eval/rewards/margins", "eval margin"),
        ],
    ),
    ("KL estimate (clamped at 0)", [("kl", "train"), ("eval/kl", "eval")]),
)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, one dict per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have it."""
    pts = [(r["step"], float(r[key])) for r in records if key in r and r[key] is not None]
    return [s for s, _ in pts], [v for _, v in pts]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step metrics of small batches are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Write a 3-panel PNG (loss, rewards, kl vs step). Returns its path, or None
    when matplotlib is not installed (`pip install matplotlib`, or the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(15, 4))
    for ax, (title, keys) in zip(axes, PANELS):
        for key, label in keys:
            steps, values = series(records, key)
            if not steps:
                continue
            if key.startswith("eval/"):
                ax.plot(steps, values, label=label, marker="o")
                continue
            # Raw per-step values faint, their moving average solid, same colour.
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            window = max(1, len(values) // 15)
            ax.plot(steps, smooth(values, window), color=line.get_color(), label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    try:  # atomic, with the user's umask (a .png suffix tells matplotlib the format)
        atomic_write_with(png_path, lambda p: fig.savefig(p, dpi=100), suffix=".png")
    finally:
        plt.close(fig)
    return png_path
