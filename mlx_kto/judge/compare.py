"""`mlx-kto compare`: the base model and one or more adapters on the same held-out prompts.

Per model: N seeded samples per prompt (the same draws for every model), then reward
accuracy and margin on labelled held-out rows (through `mlx_kto.judge.evaluate`), mean reply
length, distinct-1/2, self-BLEU, the mean per-token entropy of the model on its own
samples, and, with a judge, the win rate of each adapter against the base.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.data.rows import find_split_files, load_examples
from mlx_kto.errors import UserError
from mlx_kto.judge import report
from mlx_kto.judge.evaluate import evaluate_adapter
from mlx_kto.judge.judges import ModelJudge, load_rule, win_rate
from mlx_kto.judge.plot import plot_compare
from mlx_kto.judge.sample import (
    check_sampling,
    load_prompts,
    prompt_ids,
    sample_replies,
    summarize,
)
from mlx_kto.model.load import load_base, load_init_adapter
from mlx_kto.runtime.outputs import check_out_files

BASE = "base"
OUTPUTS = ("compare.json", "report.html", "compare.png")


@dataclass
class CompareSettings:
    model: str  # base model: folder or hub id
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, folder)
    data: str | None = None  # data folder / feedback file / prompts file
    split: str | None = None  # data folder split (default: test, else valid)
    num_prompts: int = 32  # held-out prompts used (the first N distinct ones)
    samples: int = 4  # samples per prompt
    max_tokens: int = 128
    temp: float = 1.0
    seed: int = 0
    chat: bool = True  # plain-text prompts get the chat template (when there is one)
    judge: str | None = None  # module:function
    judge_model: str | None = None  # a local model as pairwise judge
    out: str = "kto-compare"
    dtype: str | None = None
    overwrite: bool = False  # replace the report files of an earlier compare in `out`
    batch_size: int = 4  # labelled-rows evaluation micro-batch
    max_length: int = 1024


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` or `PATH` (named by its folder) -> unique (name, path) pairs."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise UserError(f"adapter-path: '{spec}' is not PATH or NAME=PATH")
        if not (Path(path) / "adapters.safetensors").is_file():
            raise UserError(f"adapter-path: {path} has no adapters.safetensors")
        if name == BASE or name in {n for n, _ in out}:
            raise UserError(f"adapter-path: the name '{name}' is taken; use NAME=PATH")
        out.append((name, path))
    return out


def _labelled(data: str | None, split: str | None) -> tuple[str | None, str]:
    """(data source of labelled rows, split for evaluate) or (None, reason) for a prompts file."""
    if data is None:
        return None, "no --data"
    p = Path(data)
    if p.is_dir():
        files = find_split_files(p)
        return data, split or next((s for s in ("test", "valid") if s in files), "valid")
    try:
        load_examples(p)
    except UserError:
        load_prompts(p)  # a prompts file: fine (errors in it surface here, with the line)
        return None, "a prompts file has no labels"
    return data, "valid"  # a single file: evaluate falls back to its only split


def _adapter_kto(path: str) -> dict:
    try:
        conf = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}
    kto = conf.get("kto") or {}
    return {k: kto[k] for k in ("beta", "loss_type") if kto.get(k) is not None}


def _load(settings: CompareSettings, adapter: str | None):
    cfg = KTOConfig(model=settings.model, dtype=settings.dtype)
    model, tokenizer, _, _ = load_base(cfg)
    if adapter is not None:
        load_init_adapter(model, adapter, what="--adapter-path")
    model.eval()
    return model, tokenizer


def labelled_metrics(settings: CompareSettings, adapter: str, data: str, split: str) -> dict:
    """Reward accuracy and margin of an adapter on labelled rows (mlx_kto.judge.evaluate)."""
    kw = dict(batch_size=settings.batch_size, max_length=settings.max_length)
    kw.update(_adapter_kto(adapter))  # score with the beta the adapter was trained with
    if kw.get("loss_type") == "kto" and kw["batch_size"] < 2:
        kw["batch_size"] = 2
    cfg = make_config(None, model=settings.model, data=data, dtype=settings.dtype, **kw)
    ev = evaluate_adapter(cfg, adapter, split)
    return {
        "reward_accuracy": ev.get("rewards/accuracy"),
        "reward_margin": ev.get("rewards/margins"),
        "labelled_rows": ev.get("rows"),
    }


def run_compare(settings: CompareSettings, log=print, echo=print) -> dict:
    """Sample, measure and judge every model; write compare.json, compare.png and
    report.html into settings.out; print the table with `echo` (progress goes to `log`).
    Returns the JSON document."""
    if settings.samples < 1 or settings.num_prompts < 1:
        raise UserError("samples and num-prompts: must be >= 1")
    check_sampling(settings.temp, max_tokens=settings.max_tokens, seed=settings.seed)
    if settings.judge and settings.judge_model:
        raise UserError("judge: give --judge or --judge-model, not both")
    if settings.data is None:
        raise UserError("data: no --data (a data folder, feedback file or prompts file)")
    judge = load_rule(settings.judge) if settings.judge else None  # fail before sampling
    prompts, source = load_prompts(settings.data, settings.split, settings.num_prompts)
    label_data, split = _labelled(settings.data, settings.split)
    out_dir = check_out_files(settings.out, OUTPUTS, settings.overwrite)
    log(
        f"{len(prompts)} held-out prompts from {source} x {settings.samples} samples "
        f"(temperature {settings.temp}, seed {settings.seed})"
    )
    models = [(BASE, None), *settings.adapters]
    results: dict[str, dict] = {}
    replies: dict[str, list[list[str]]] = {}
    for name, adapter in models:
        log(f"sampling {name}{f' ({adapter})' if adapter else ''} ...")
        model, tokenizer = _load(settings, adapter)
        ids = [prompt_ids(tokenizer, p.prompt, chat=settings.chat, raw=p.raw, where=p.where)
               for p in prompts]  # fmt: skip
        samples = sample_replies(
            model,
            tokenizer,
            ids,
            n=settings.samples,
            max_tokens=settings.max_tokens,
            temp=settings.temp,
            seed=settings.seed,
        )
        del model
        gc.collect()
        replies[name] = [[s.text for s in per] for per in samples]
        res = {"adapter": adapter, **summarize(samples)}
        if adapter is None:
            # The base is its own reference: every implied reward is 0.
            res.update(reward_accuracy=None, reward_margin=0.0 if label_data else None)
        elif label_data:
            try:
                res.update(labelled_metrics(settings, adapter, label_data, split))
            except UserError as e:
                log(f"warning: labelled rows of {name} not scored: {e}")
                res.update(reward_accuracy=None, reward_margin=None, labelled_note=str(e))
        else:
            res.update(reward_accuracy=None, reward_margin=None)
        results[name] = res
    if settings.judge_model:
        log(f"judging with {settings.judge_model} (both orders) ...")
        jm, jt, _, _ = load_base(KTOConfig(model=settings.judge_model, dtype=settings.dtype))
        judge = ModelJudge(jm, jt)
    texts = [p.text for p in prompts]
    for name, _ in models:
        if judge is not None and name != BASE:
            results[name].update(win_rate(judge, texts, replies[name], replies[BASE]))
        else:
            results[name].update(wins=None, losses=None, ties=None, win_rate=None)
    doc = {
        "settings": {
            **{k: v for k, v in dataclasses.asdict(settings).items() if k != "adapters"},
            "adapters": {n: p for n, p in settings.adapters},
        },
        "prompt_source": source,
        "labelled_rows": (
            {"data": label_data, "split": split if Path(label_data).is_dir() else None}
            if label_data
            else None
        ),
        "judge": settings.judge or settings.judge_model,
        "models": results,
        "samples": [
            {"prompt": p.text, "replies": {n: replies[n][i] for n, _ in models}}
            for i, p in enumerate(prompts)
        ],
    }
    report.write_json(out_dir / "compare.json", doc)
    png = plot_compare(results, out_dir / "compare.png")
    report.write_html(out_dir / "report.html", doc, png)
    for line in report.table(results):
        echo(line)
    echo(
        f"wrote {out_dir / 'compare.json'}, {out_dir / 'report.html'}" + (f", {png}" if png else "")
    )
    return doc
