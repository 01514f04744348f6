"""The comparison's outputs: a terminal table, a JSON file and an HTML report (the figures,
the plot embedded as a PNG, and every prompt's samples side by side)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from mlx_kto.judge.files import atomic_write_text

COLUMNS = (  # (key, header, format)
    ("reward_accuracy", "acc", "{:.1%}"),
    ("reward_margin", "margin", "{:+.3f}"),
    ("length", "len", "{:.1f}"),
    ("distinct_1", "dist-1", "{:.3f}"),
    ("distinct_2", "dist-2", "{:.3f}"),
    ("self_bleu", "self-BLEU", "{:.3f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("wlt", "win/loss/tie", "{}"),
    ("win_rate", "win rate", "{:.1%}"),
)
EXPLAIN = (
    "acc / margin: reward accuracy and mean reward margin on labelled held-out rows "
    "(the base is its own reference: margin 0); len: mean reply length in tokens; "
    "dist-1/2: distinct uni/bigrams over all replies (higher = more varied); self-BLEU: "
    "how alike a prompt's samples are (higher = more alike; near 1 = collapse); entropy: "
    "mean per-token entropy of the model on its own samples (nats); win rate: against "
    "the base by the judge, ties counted half."
)


def _cell(res: dict, key: str, fmt: str) -> str:
    if key == "wlt":
        if res.get("wins") is None:
            return "-"
        return f"{res['wins']}/{res['losses']}/{res['ties']}"
    v = res.get(key)
    return "-" if v is None else fmt.format(v)


def table(results: dict[str, dict]) -> list[str]:
    """The results as aligned text lines, one row per model."""
    rows = [["model", *(h for _, h, _ in COLUMNS)]]
    rows += [[name, *(_cell(r, k, f) for k, _, f in COLUMNS)] for name, r in results.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def write_json(path: str | Path, doc: dict) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples td { max-width: 28em; white-space: pre-wrap; font-size: 90%; }
.prompt { font-weight: 600; margin-top: 1.5em; }
img { max-width: 100%; }
p.note { color: #555; max-width: 60em; }
"""


def write_html(path: str | Path, doc: dict, png: str | Path | None = None) -> Path:
    """A self-contained HTML page: settings, the figures, the plot (embedded), samples."""
    e = html.escape
    results = doc["models"]
    names = list(results)
    s = doc["settings"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>mlx-kto compare: {e(str(s.get('model')))}</title><style>{_CSS}</style></head><body>",
        "<h1>mlx-kto compare</h1>",
        f"<p>base model <code>{e(str(s.get('model')))}</code>; prompts from "
        f"<code>{e(str(doc.get('prompt_source')))}</code> ({len(doc['samples'])} prompts x "
        f"{s.get('samples')} samples, temperature {s.get('temp')}, seed {s.get('seed')}); "
        f"judge: {e(str(doc.get('judge') or 'none'))}</p>",
        "<table><tr><th>model</th><th>adapter</th>",
        *(f"<th>{e(h)}</th>" for _, h, _ in COLUMNS),
        "</tr>",
    ]
    for name in names:
        r = results[name]
        parts.append(
            f"<tr><td>{e(name)}</td><td><code>{e(str(r.get('adapter') or '-'))}</code></td>"
        )
        parts += [f"<td class='num'>{e(_cell(r, k, f))}</td>" for k, _, f in COLUMNS]
        parts.append("</tr>")
    parts += ["</table>", f"<p class='note'>{e(EXPLAIN)}</p>"]
    if png is not None and Path(png).is_file():
        b64 = base64.b64encode(Path(png).read_bytes()).decode()
        parts.append(f"<img alt='comparison plot' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Samples</h2>")
    for item in doc["samples"]:
        parts.append(f"<div class='prompt'>{e(item['prompt'])}</div>")
        parts.append("<table class='samples'><tr>" + "".join(f"<th>{e(n)}</th>" for n in names))
        parts.append("</tr>")
        depth = max(len(v) for v in item["replies"].values())
        for i in range(depth):
            cells = []
            for n in names:
                reps = item["replies"].get(n, [])
                cells.append(f"<td>{e(reps[i]) if i < len(reps) else ''}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    return atomic_write_text(path, "\n".join(parts))
