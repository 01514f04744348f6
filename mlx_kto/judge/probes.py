"""Diversity probes during training: is the policy collapsing onto one kind of answer?

Every `diversity_every` steps (and at each checkpoint and the last step) the probe
samples `diversity_samples` replies to each of a fixed set of `diversity_prompts`
prompts (from the validation split, else the training split) and logs into that step's
metrics.jsonl record:

    diversity/distinct_1, diversity/distinct_2, diversity/self_bleu, diversity/entropy,
    diversity/length, and the base model's figures as diversity/base/...

The base figures are measured once at the start with the adapter bypassed
(`model.reference_mode`). When the policy's distinct-2, its 1 - self-BLEU (novelty) or
its entropy falls below `collapse_threshold` times the base's, the probe warns once
(mode collapse: the KTO paper's practical advice is to watch exactly this) and marks the
record with diversity/collapse = 1.
"""

from __future__ import annotations

from collections.abc import Callable

from mlx_kto.errors import UserError
from mlx_kto.judge.plot import plot_after_training
from mlx_kto.judge.sample import sample_replies, summarize
from mlx_kto.model.load import reference_mode
from mlx_kto.train.run import Extras

from tqdm import tqdm

PREFIX = "diversity/"
BASE_PREFIX = "diversity/base/"
CHECKED = (  # (name, how to read it off the summary): higher = more diverse
    ("distinct-2", lambda d: d["distinct_2"]),
    ("1 - self-BLEU", lambda d: None if d["self_bleu"] is None else 1.0 - d["self_bleu"]),
    ("entropy", lambda d: d.get("entropy")),
)


def _check(cfg) -> None:
    for name in ("diversity_prompts", "diversity_samples", "diversity_max_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: must be >= 1")
    if cfg.diversity_every < 0:
        raise UserError("diversity_every: must be >= 0 (0 = no diversity probes)")
    if cfg.diversity_samples < 2:
        raise UserError(
            "diversity_samples: needs >= 2 samples per prompt (self-BLEU compares them)"
        )
    if not 0 < cfg.collapse_threshold < 1:
        raise UserError("collapse_threshold: must be in (0, 1), a share of the base's diversity")


def collapsed(current: dict, base: dict, threshold: float) -> list[str]:
    """The figures (higher = more diverse) that fell below `threshold` x the base's."""
    out = []
    for name, get in CHECKED:
        now, ref = get(current), get(base)
        if now is not None and ref is not None and ref > 0 and now < threshold * ref:
            out.append(f"{name} {now:.3f} < {threshold:g} x base {ref:.3f}")
    return out


class DiversityProbe:
    """Samples a fixed prompt set and logs diversity figures (see the module docstring)."""

    def __init__(self, model, tokenizer, prompt_ids: list[list[int]], cfg, frozen=None, log=print):
        self.model, self.tokenizer, self.prompt_ids = model, tokenizer, prompt_ids
        self.cfg, self.frozen, self.log = cfg, frozen, log
        self.base: dict | None = None
        self.warned = False

    def measure(self) -> dict:
        samples = sample_replies(
            self.model,
            self.tokenizer,
            self.prompt_ids,
            n=self.cfg.diversity_samples,
            max_tokens=self.cfg.diversity_max_tokens,
            temp=1.0,  # the model's own distribution
            seed=self.cfg.seed,  # the same draws at every probe: changes are the model's
        )
        return summarize(samples)

    def start(self) -> dict:
        """The base model's figures (adapter bypassed), measured once."""
        with reference_mode(self.model, self.frozen):
            self.base = self.measure()
        self._log(f"diversity of the base ({len(self.prompt_ids)} prompts): {_fmt(self.base)}")
        return self.base

    def due(self, step: int, n_steps: int) -> bool:
        every, save = self.cfg.diversity_every, self.cfg.steps_per_save
        return step % every == 0 or bool(save and step % save == 0) or step == n_steps

    def __call__(self, step: int, record: dict, n_steps: int) -> None:
        """At a due step: measure and add the figures to `record`; warn once on collapse."""
        if not self.due(step, n_steps):
            return
        if self.base is None:
            self.start()
        now = self.measure()
        record.update({PREFIX + k: v for k, v in now.items()})
        record.update({BASE_PREFIX + k: v for k, v in self.base.items()})
        fallen = collapsed(now, self.base, self.cfg.collapse_threshold)
        if fallen:
            record[PREFIX + "collapse"] = 1
            if not self.warned:
                self.warned = True
                self._log(
                    f"warning: possible mode collapse at step {step}: {'; '.join(fallen)}. "
                    "The policy's replies are much less varied than the base's; consider a "
                    "higher --beta, a lower --learning-rate, fewer steps, or an earlier "
                    "checkpoint."
                )

    def _log(self, msg: str) -> None:
        with tqdm.external_write_mode():  # above a running progress bar, not through it
            self.log(msg)


def _fmt(d: dict) -> str:
    sb = "-" if d["self_bleu"] is None else f"{d['self_bleu']:.3f}"
    return (
        f"distinct-1 {d['distinct_1']:.3f} distinct-2 {d['distinct_2']:.3f} self-BLEU {sb} "
        f"entropy {d.get('entropy', 0):.3f} length {d.get('length', 0):.1f}"
    )


def probe_prompts(rows, k: int) -> list[list[int]]:
    """The first k distinct prompts (token ids) of tokenized rows."""
    seen, out = set(), []
    for r in rows:
        key = tuple(r.prompt_ids)
        if key not in seen:
            seen.add(key)
            out.append(list(r.prompt_ids))
        if len(out) == k:
            break
    return out


def make_probe(
    cfg, model, tokenizer, rows, frozen=None, log: Callable[[str], None] = print
) -> DiversityProbe | None:
    """The run's probe (None when cfg.diversity_every is 0), on the prompts of `rows`
    (the validation rows, else the training rows). Measures the base right away."""
    _check(cfg)
    if not cfg.diversity_every or not rows:
        return None
    probe = DiversityProbe(
        model, tokenizer, probe_prompts(rows, cfg.diversity_prompts), cfg, frozen, log
    )
    probe.start()
    return probe


def training_extras() -> Extras:
    """The judge's part of a training run: the diversity probe and training.png."""
    return Extras(probe=make_probe, plot=plot_after_training)
