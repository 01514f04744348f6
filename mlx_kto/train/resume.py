"""`--resume`: which folder a resumed run writes to, and that it continues the same run.

- The run folder is the one given (a checkpoint's `run/checkpoints/step_N` -> `run`), never
  the path stored in the checkpoint: a moved run folder resumes in its new place.
- Model / data / adapter paths are stored absolute (hub ids as typed), so a run resumes
  from any working directory.
- A checkpoint records the training data's content hash and the setup (SETUP_FIELDS); a
  resume with other data or another setup is refused, naming what changed, unless
  `--resume-changed`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from mlx_kto.config.core import KTOConfig
from mlx_kto.errors import UserError

# What decides the trained adapter, besides the data. Left out on purpose: iters / epochs
# (extending a run is what --resume is for), reporting, saving, compile, memory and cache
# settings, and the data path (its content is compared instead).
SETUP_FIELDS = (
    "model",
    "init_adapter",
    "loss_type",
    "beta",
    "desirable_weight",
    "undesirable_weight",
    "max_length",
    "max_prompt_length",
    "batch_size",
    "grad_accumulation_steps",
    "learning_rate",
    "lr_schedule",
    "warmup_steps",
    "weight_decay",
    "adam_bias_correction",
    "max_grad_norm",
    "seed",
    "lora_rank",
    "lora_alpha",
    "lora_scale",
    "lora_dropout",
    "num_layers",
    "lora_keys",
    "quantize",
    "q_group_size",
    "dtype",
)
PATH_FIELDS = ("model", "data", "init_adapter", "ref_cache")


def run_dir_of(resume: str | Path) -> Path:
    """The run folder of a `--resume` path: a run folder itself, or the run folder holding
    a checkpoint folder (`run/checkpoints/step_N`)."""
    p = Path(resume)
    if p.parent.name == "checkpoints" and p.name.startswith("step_"):
        return p.parent.parent
    return p


def absolute_paths(cfg: KTOConfig) -> None:
    """Local paths in cfg made absolute (so a resume works from any directory); a hub id
    (no such local path) is kept as typed."""
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and Path(value).expanduser().exists():
            setattr(cfg, name, str(Path(value).expanduser().resolve()))


def rows_hash(rows) -> str:
    """blake2b of the tokenized training rows (prompt ids, completion ids, label), in order.
    Content, not a file: the same for every source (file, folder, parquet, hub id, rows given
    to the Python API), and it also changes when the tokenizer or truncation does."""
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(repr((r.prompt_ids, r.completion_ids, bool(r.label))).encode())
    return h.hexdigest()


def _same(name: str, old, new) -> bool:
    if name in PATH_FIELDS and old and new:
        old_p, new_p = Path(old).expanduser(), Path(new).expanduser()
        if old_p.exists() and new_p.exists():
            return old_p.resolve() == new_p.resolve()
    if isinstance(old, (int, float)) and isinstance(new, (int, float)):
        return float(old) == float(new)
    return old == new


def check_unchanged(ckpt: Path, saved: dict, cfg: KTOConfig, data_digest: str) -> None:
    """Refuse to resume `saved` (a checkpoint's trainer state) with other data or another
    setup than it was trained with, unless cfg.resume_changed."""
    if getattr(cfg, "resume_changed", False):
        return
    old_cfg = saved.get("config", {})
    changed = [
        f"{name} {old_cfg.get(name)!r} -> {getattr(cfg, name)!r}"
        for name in SETUP_FIELDS
        if name in old_cfg and not _same(name, old_cfg.get(name), getattr(cfg, name))
    ]
    old_data = saved.get("data_hash")
    if old_data is not None and old_data != data_digest:
        changed.insert(0, f"data (the content of the training data {cfg.data} changed)")
    if changed:
        raise UserError(
            f"resume: {ckpt} was trained with another setup: {'; '.join(changed)}; resume "
            "with the original settings, or pass --resume-changed to continue anyway"
        )


def check_no_newer(ckpt: Path, run_dir: Path) -> None:
    """Resuming an older checkpoint inside its own run folder would mix two timelines."""
    from mlx_kto.train.checkpoint import list_checkpoints

    newer = [c for c in list_checkpoints(run_dir) if c.name > ckpt.name]
    if run_dir_of(ckpt).resolve() == run_dir.resolve() and newer:
        raise UserError(
            f"resume: {run_dir} has checkpoints newer than {ckpt.name} ({newer[-1].name}); "
            f"resume from the run folder (its newest checkpoint), or branch off with "
            f"--adapter-path NEW_FOLDER"
        )
