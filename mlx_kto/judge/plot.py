"""Plots of a run (training.png from metrics.jsonl) and of a comparison (compare.png).

matplotlib with its Agg backend (no display); files are written atomically. Panels
without data in the run (no eval split, no diversity probes) are left out.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.judge.files import atomic_write, read_text
from mlx_kto.runtime.outputs import check_out_file

# (title, [(metrics key, label)], base keys drawn as dashed lines {key: base key})
PANELS = (
    ("loss", [("loss", "train"), ("eval/loss", "eval")]),
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
    ("eval reward accuracy", [("eval/rewards/accuracy", "eval")]),
    (
        "diversity of sampled replies",
        [
            ("diversity/distinct_1", "distinct-1"),
            ("diversity/distinct_2", "distinct-2"),
            ("diversity/self_bleu", "self-BLEU"),
        ],
    ),
    ("entropy of own samples (nats/token)", [("diversity/entropy", "entropy")]),
)
BASE_PREFIX = "diversity/base/"  # the base model's figures, logged beside the run's


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, one dict per line (a torn last line is skipped)."""
    out = []
    lines = read_text(path).splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # a line being written while we read
            raise UserError(f"{path}:{i + 1}: not a JSON line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{i + 1}: not a JSON object (a metrics record)")
        out.append(record)
    return out


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that have it."""
    pts = [
        (r["step"], float(r[key]))
        for r in records
        if _number(r.get(key)) and _number(r.get("step"))
    ]
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


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, plt, png_path: str | Path) -> Path:
    try:
        return atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def plot_metrics(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Write the run's PNG (loss, rewards, kl, eval accuracy, diversity, entropy vs step;
    only the panels the run has data for). Returns its path, or None when matplotlib is
    not installed."""
    plt = _pyplot()
    if plt is None:
        return None
    records = read_metrics(metrics_path)
    panels = [(t, keys) for t, keys in PANELS if any(series(records, k)[0] for k, _ in keys)]
    if not panels:
        raise UserError(f"{metrics_path}: no metrics to plot")
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key, label in keys:
            steps, values = series(records, key)
            if not steps:
                continue
            if key.startswith(("eval/", "diversity/")):
                (line,) = ax.plot(steps, values, label=label, marker="o", markersize=3)
                base = key.replace("diversity/", BASE_PREFIX, 1)
                _, base_vals = series(records, base) if key.startswith("diversity/") else (0, [])
                if base_vals:
                    ax.axhline(base_vals[0], color=line.get_color(), linestyle="--", alpha=0.6)
                continue
            # Raw per-step values faint, their moving average solid, same colour.
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            window = max(1, len(values) // 15)
            ax.plot(steps, smooth(values, window), color=line.get_color(), label=label)
        if title.startswith(("diversity", "entropy")):
            title += "  (dashed: base)"
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, plt, png_path)


def plot_run(
    run_dir: str | Path, png_path: str | Path | None = None, overwrite: bool = False
) -> Path | None:
    """training.png of a run folder (from its metrics.jsonl), replaced when it exists: the
    run's own plot. Another `png_path` is checked first: an existing file there is
    replaced only with `overwrite`."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if png_path is not None:
        png_path = check_out_file(png_path, overwrite)
    if not metrics.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a training run folder?)")
    return plot_metrics(metrics, png_path or metrics.parent / "training.png")


COMPARE_BARS = (  # (key in a model's results, title)
    ("reward_accuracy", "reward accuracy (labelled rows)"),
    ("reward_margin", "reward margin (labelled rows)"),
    ("win_rate", "win rate vs base (ties half)"),
    ("length", "mean reply length (tokens)"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("self_bleu", "self-BLEU (lower = more varied)"),
    ("entropy", "entropy of own samples (nats/token)"),
)


def plot_compare(results: dict[str, dict], png_path: str | Path) -> Path | None:
    """One bar chart per metric over the compared models (base first)."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(results)
    bars = [(k, t) for k, t in COMPARE_BARS if any(results[n].get(k) is not None for n in names)]
    cols = min(4, len(bars))
    nrows = (len(bars) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False)
    colors = [f"C{i}" for i in range(len(names))]
    for ax, (key, title) in zip(axes.flat, bars):
        vals = [results[n].get(key) for n in names]
        ax.bar(range(len(names)), [v if v is not None else 0 for v in vals], color=colors)
        for i, v in enumerate(vals):
            ax.text(
                i, v or 0, "-" if v is None else f"{v:.3g}", ha="center", va="bottom", fontsize=8
            )
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(bars) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, plt, png_path)


def plot_after_training(run_dir: str | Path, log=print) -> Path | None:
    """training.png at the end of `train`; a plot problem is a note, never a failed run."""
    try:
        path = plot_run(run_dir)
    except (UserError, OSError, ValueError) as e:
        log(f"plot: skipped ({e})")
        return None
    if path is None:
        log("plot: skipped (matplotlib is not installed: pip install matplotlib)")
    else:
        log(f"plot: {path}")
    return path
