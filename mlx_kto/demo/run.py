"""`mlx-kto demo`: watch KTO change a model's behaviour, with no download.

1. Sample the shipped base model on held-out questions: a mix of polite, terse
   and rude answers (measured by `task.classify`).
2. Train a LoRA adapter with `mlx_kto.train.run.train` on the shipped thumbs-up/down
   feedback (~30% desirable, like real feedback; `desirable_weight: auto`).
3. Sample again with the adapter (loaded the way mlx-lm loads it) and print the
   before/after table: style shares, reward margin on held-out feedback, samples.

Writes to the run folder: the adapter, metrics.jsonl, training.png (when
matplotlib is installed) and demo_results.json.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.demo.plot import plot_metrics
from mlx_kto.demo.sample import correct_share, sample_completions, style_shares
from mlx_kto.demo.task import DESIRABLE_STYLE, STYLES, classify
from mlx_kto.errors import UserError
from mlx_kto.judge.diversity import distinct_n, mean_self_bleu
from mlx_kto.judge.probes import training_extras
from mlx_kto.model.load import load_base
from mlx_kto.runtime.atomic import atomic_write_bytes
from mlx_kto.runtime.paths import DEMO_ASSETS as ASSETS
from mlx_kto.train.run import train
from mlx_kto.train.run_dir import existing_run_files

DEFAULT_OUT = "kto-demo"
# Settings for the shipped model; a field the user set (different from KTOConfig's
# default) wins over these.
DEMO_DEFAULTS = dict(
    adapter_path=DEFAULT_OUT,
    dtype="float32",  # weights ship in float16; CPU matmuls are fastest in float32
    iters=120,
    batch_size=8,
    learning_rate=5e-4,  # a tiny model with LoRA moves slowly at LLM-sized rates
    lr_schedule="cosine",
    # Good and bad answers share their content ("It is blue."): a higher beta saturates
    # the loss sooner, so pushing the rude style down does not drag the content with it.
    beta=0.5,
    desirable_weight="auto",  # ~30% desirable: lambda_D from the class balance
    lora_rank=8,
    lora_alpha=16.0,
    num_layers=2,  # LoRA on the last 2 of 4 blocks: enough for style, keeps the content
    max_length=64,
    steps_per_eval=30,
    diversity_every=30,  # sample probe questions: the plot's diversity panels
    steps_per_report=20,
    steps_per_save=0,
    keep_checkpoints=1,
)
# The shortened run (`--quick`, the test): fewer steps at a higher rate, fewer samples.
QUICK = dict(iters=40, learning_rate=1e-3, samples=6)
SAMPLES_PER_PROMPT = 16
MAX_NEW_TOKENS = 32


@dataclass
class DemoResult:
    run_dir: Path
    adapter_path: Path
    metrics_path: Path
    plot_path: Path | None
    before: dict  # style -> share of sampled completions, base model (+ "correct")
    after: dict  # the same with the trained adapter
    eval_metrics: dict  # final eval on the held-out feedback (reward margin, accuracy, ...)
    samples: list = field(default_factory=list)  # [(prompt, before, after)]
    seconds: float = 0.0
    steps: int = 0


def demo_config(
    cfg: KTOConfig | None = None,
    out: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    quick: bool = False,
) -> KTOConfig:
    """The training config of the demo: the shipped model and data, demo defaults
    for every field `cfg` left at KTOConfig's default, then out/steps/seed."""
    base = KTOConfig()
    cfg = cfg if cfg is not None else base
    # Demo defaults for the fields the user left at KTOConfig's default.
    changes = {k: v for k, v in DEMO_DEFAULTS.items() if getattr(cfg, k) == getattr(base, k)}
    if quick:  # the shortened run, unless the user chose these
        for k in ("iters", "learning_rate"):
            if changes.get(k, getattr(cfg, k)) == DEMO_DEFAULTS[k]:
                changes[k] = QUICK[k]
    changes["model"] = cfg.model or str(ASSETS / "model")
    changes["data"] = cfg.data or str(ASSETS / "data")
    given = {"adapter_path": None if out is None else str(out), "iters": steps, "seed": seed}
    changes.update({k: v for k, v in given.items() if v is not None})
    cfg = dataclasses.replace(cfg, **changes)
    if not (Path(cfg.model) / "model.safetensors").exists():
        raise UserError(
            f"{cfg.model}: the demo model is missing; rebuild it with "
            "`python examples/build_demo_model.py` (or reinstall mlx-kto)"
        )
    return cfg.validate()


def check_out_folder(cfg: KTOConfig, log=print) -> KTOConfig:
    """The demo's run folder, checked before any work: empty, or a previous demo run (on the
    shipped model: replaced, as running the demo again should, said in a line), or, with
    cfg.overwrite, any run. Another run there is refused: the demo never replaces work it
    was not asked to. Returns cfg, with overwrite set where a demo run is replaced."""
    out = Path(cfg.adapter_path)
    found = existing_run_files(out) if out.is_dir() else []
    if not found or cfg.overwrite:
        return cfg
    if not is_demo_run(out):
        raise UserError(
            f"adapter_path: {out} already holds a run ({', '.join(found)}) that the demo "
            "would replace; pass --overwrite to replace it, or give the demo another folder"
        )
    log(f"replacing the previous demo run in {out}")
    return dataclasses.replace(cfg, overwrite=True)


def is_demo_run(run_dir: Path) -> bool:
    """A run folder written by the demo: trained on the shipped model."""
    try:
        model = json.loads((run_dir / "kto_config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(model, str) and Path(model).resolve() == (ASSETS / "model").resolve()


def heldout_prompts() -> list[str]:
    return json.loads((ASSETS / "heldout_prompts.json").read_text())


def load_policy(cfg: KTOConfig, adapter_dir: str | Path | None = None):
    """The base model (cfg.dtype applied), with an mlx-lm adapter folder loaded
    through mlx-lm's own `load_adapters` when given."""
    model, tokenizer, _, _ = load_base(cfg)
    if adapter_dir is not None:
        from mlx_lm.tuner.utils import load_adapters  # imports torch (~5 s): only here

        model = load_adapters(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def run_demo(
    cfg: KTOConfig | None = None,
    out: str | None = None,
    steps: int | None = None,
    seed: int | None = None,
    quick: bool = False,
    samples_per_prompt: int | None = None,
    echo=None,
    log=None,
) -> DemoResult:
    """Run the demo end to end and print the before/after table (`echo`, stdout);
    training progress goes to `log` (stderr)."""
    echo = echo or (lambda msg="": print(msg, flush=True))
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    cfg = check_out_folder(demo_config(cfg, out, steps, seed, quick), log)
    n = samples_per_prompt or (QUICK["samples"] if quick else SAMPLES_PER_PROMPT)
    prompts = heldout_prompts()
    sample_kw = dict(n=n, max_tokens=MAX_NEW_TOKENS, temp=1.0, seed=cfg.seed)

    echo(f"KTO demo: a {_params(cfg.model)} Llama answers questions politely, tersely or rudely;")
    echo(f"it learns from {_feedback_summary(cfg.data)} to prefer polite answers.")
    echo(f"sampling the base model: {len(prompts)} held-out questions x {n} samples ...")
    model, tokenizer = load_policy(cfg)
    before_samples = sample_completions(model, tokenizer, prompts, **sample_kw)
    before = style_shares(before_samples)
    before["correct"] = correct_share(prompts, before_samples)
    before.update(_diversity(before_samples))
    echo(f"  {DESIRABLE_STYLE} share before training: {before[DESIRABLE_STYLE]:.1%}")
    del model

    echo(f"training a LoRA adapter for {cfg.iters} steps -> {cfg.adapter_path}")
    result = train(cfg, log=log, extras=training_extras())

    model, tokenizer = load_policy(cfg, result.adapter_path)
    after_samples = sample_completions(model, tokenizer, prompts, **sample_kw)
    after = style_shares(after_samples)
    after["correct"] = correct_share(prompts, after_samples)
    after.update(_diversity(after_samples))
    run_dir = Path(cfg.adapter_path)
    plot_path = plot_metrics(result.metrics_path, run_dir / "training.png")
    pairs = _pick_pairs(prompts, before_samples, after_samples, k=4, seed=cfg.seed)
    res = DemoResult(
        run_dir=run_dir,
        adapter_path=Path(result.adapter_path),
        metrics_path=Path(result.metrics_path),
        plot_path=plot_path,
        before=before,
        after=after,
        eval_metrics=result.eval_metrics,
        samples=pairs,
        seconds=time.perf_counter() - t0,
        steps=result.steps,
    )
    for line in format_report(res, n_prompts=len(prompts), n=n):
        echo(line)
    _write_results(res, run_dir / "demo_results.json", cfg)
    return res


def format_report(res: DemoResult, n_prompts: int, n: int) -> list[str]:
    """The before/after table, sample pairs and where the files went."""
    ev = res.eval_metrics
    lines = [
        "",
        f"before / after KTO, measured by sampling {n_prompts} held-out questions x {n} "
        "(temperature 1.0)",
        f"  {'':34}{'before':>9}{'after':>9}",
    ]
    for style in STYLES:
        tag = f"{style} answers" + (" (desirable)" if style == DESIRABLE_STYLE else "")
        lines.append(f"  {tag:34}{res.before[style]:>9.1%}{res.after[style]:>9.1%}")
    other_b = res.before["mixed"] + res.before["empty"]
    other_a = res.after["mixed"] + res.after["empty"]
    if other_b or other_a:
        lines.append(f"  {'mixed or empty':34}{other_b:>9.1%}{other_a:>9.1%}")
    lines.append(
        f"  {'right answer (any style)':34}{res.before['correct']:>9.1%}{res.after['correct']:>9.1%}"
    )
    # Diversity: KTO should change the style without collapsing onto one fixed answer.
    lines.append(
        f"  {'distinct-2 (all answers)':34}{res.before['distinct_2']:>9.3f}"
        f"{res.after['distinct_2']:>9.3f}"
    )
    if res.before["self_bleu"] is not None and res.after["self_bleu"] is not None:
        lines.append(
            f"  {'self-BLEU (same question)':34}{res.before['self_bleu']:>9.3f}"
            f"{res.after['self_bleu']:>9.3f}"
        )
    if "rewards/margins" in ev:
        # Before training the policy is the reference, so every implied reward is 0.
        lines.append(
            f"  {'mean reward margin (held-out rows)':34}{0.0:>9.3f}{ev['rewards/margins']:>+9.3f}"
        )
    if "rewards/accuracy" in ev:
        lines.append(
            f"  {'reward accuracy (held-out rows)':34}{'-':>9}{ev['rewards/accuracy']:>9.1%}"
        )
    lines += ["", "samples (same question, before -> after):"]
    for prompt, b, a in res.samples:
        lines.append(f"  Q: {prompt}")
        lines.append(f"     before [{classify(b)}]: {_short(b)}")
        lines.append(f"     after  [{classify(a)}]: {_short(a)}")
    lines.append("")
    lines.append(f"adapter:  {res.adapter_path}  (mlx_lm.load(model, adapter_path=...) loads it)")
    lines.append(f"metrics:  {res.metrics_path}")
    if res.plot_path is not None:
        lines.append(f"plot:     {res.plot_path}")
    else:
        lines.append("plot:     skipped (matplotlib is not installed: pip install matplotlib)")
    lines.append(f"demo finished in {res.seconds:.0f}s ({res.steps} training steps)")
    return lines


def _diversity(samples: list[list[str]]) -> dict:
    """distinct-2 over every answer and self-BLEU within each question's answers."""
    return {
        "distinct_2": distinct_n([c for per in samples for c in per], 2),
        "self_bleu": mean_self_bleu(samples),
    }


def _pick_pairs(prompts, before, after, k: int, seed: int):
    """k (prompt, before sample, after sample) triples; prefer questions whose first
    before-sample is not already in the desirable style, to show the change."""
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: classify(before[i][0]) == DESIRABLE_STYLE)  # stable
    return [(prompts[i], before[i][0], after[i][0]) for i in order[:k]]


def _short(text: str, width: int = 90) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _params(model_dir: str) -> str:
    try:
        manifest = json.loads((Path(model_dir).parent / "manifest.json").read_text())
        return f"{manifest['parameters'] / 1e6:.1f}M-parameter"
    except (OSError, KeyError, ValueError):
        return "tiny"


def _feedback_summary(data: str) -> str:
    try:
        rows = [json.loads(x) for x in (Path(data) / "train.jsonl").read_text().splitlines() if x]
    except (OSError, ValueError):
        return "thumbs-up/down feedback"
    up = sum(r.get("label") in ("thumbs_up", True, 1, "good", "up") for r in rows)
    return f"{len(rows)} thumbs-up/down ratings ({up / max(len(rows), 1):.0%} thumbs up)"


def _write_results(res: DemoResult, path: Path, cfg: KTOConfig) -> None:
    data = {
        "before": res.before,
        "after": res.after,
        "eval": res.eval_metrics,
        "samples": [{"prompt": p, "before": b, "after": a} for p, b, a in res.samples],
        "steps": res.steps,
        "seconds": round(res.seconds, 1),
        "config": cfg.to_dict(),
    }
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
