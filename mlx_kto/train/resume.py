"""`--resume`: which folder a resumed run writes to, and that it continues the same run.

- The run folder is the one given (a checkpoint's `run/checkpoints/step_N` -> `run`), never
  the path stored in the checkpoint: a moved run folder resumes in its new place.
- Model / data / adapter paths are stored absolute (hub ids as typed), so a run resumes
  from any working directory.
- A checkpoint records the training data's content hash and the setup (SETUP_FIELDS); a
  resume with other data or another setup is refused, naming what changed, unless
  `--resume-changed`.
- The settings of a resumed run: KTOConfig's defaults < the checkpoint's saved config < what
  the user gives (`resume_config`; the CLI's flags and YAML, the Python API's arguments).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import replace
from pathlib import Path

from mlx_kto.config.core import KTOConfig, field_names, make_config
from mlx_kto.errors import UserError
from mlx_kto.train.checkpoint import find_checkpoint, list_checkpoints, read_state

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
# Not inherited from the checkpoint: where to write (the folder resumed, see from_checkpoint)
# and one-off permissions.
NOT_INHERITED = ("resume", "adapter_path", "overwrite", "resume_changed")
# Filled from the checkpoint when the config leaves them empty (`train(cfg)` with only
# cfg.resume set): what the run was trained on.
INPUT_FIELDS = ("model", "data", "init_adapter")
DEFAULT_ADAPTER_PATH = KTOConfig().adapter_path


def saved_config(resume: str | Path) -> dict:
    """The settings the checkpoint `resume` (a run folder: its newest) was trained with,
    less NOT_INHERITED and any field this version does not know."""
    saved = read_state(find_checkpoint(resume))["config"]
    known = set(field_names()) - set(NOT_INHERITED)
    return {k: v for k, v in saved.items() if k in known}


def resume_config(resume: str | Path, values: dict | None = None) -> KTOConfig:
    """The config of a resumed run: KTOConfig's defaults < the checkpoint's saved config <
    `values` (fields the user set; None = not set). What `mlx-kto train --resume RUN`
    and `KTOTrainer.train(resume=RUN)` train with."""
    given = {k: v for k, v in (values or {}).items() if v is not None}
    return make_config(None, **{**saved_config(resume), **given, "resume": str(resume)})


def config_changes(cfg: KTOConfig) -> dict:
    """The fields of `cfg` that differ from KTOConfig's defaults: what a config object says
    its user set (a field set to its default value is indistinguishable from one not set)."""
    default = KTOConfig()
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name)
    }


def from_checkpoint(cfg: KTOConfig, ckpt: Path, saved: dict) -> KTOConfig:
    """cfg for resuming `ckpt`: model / data / init_adapter the config leaves empty come from
    the checkpoint's config, and the default adapter_path becomes the resumed run's folder."""
    fill = {k: saved["config"].get(k) for k in INPUT_FIELDS if getattr(cfg, k) is None}
    if cfg.adapter_path == DEFAULT_ADAPTER_PATH:  # continue in the folder resumed
        fill["adapter_path"] = str(run_dir_of(ckpt))
    return replace(cfg, **fill)


def run_dir_of(resume: str | Path) -> Path:
    """The run folder of a `--resume` path: a run folder itself, or the run folder holding
    a checkpoint folder (`run/checkpoints/step_N`)."""
    p = Path(resume)
    if p.parent.name == "checkpoints" and p.name.startswith("step_"):
        return p.parent.parent
    return p


def absolute_paths(cfg: KTOConfig) -> KTOConfig:
    """cfg with its local paths made absolute (so a resume works from any directory); a hub
    id (no such local path) is kept as typed."""
    paths = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and Path(value).expanduser().exists():
            paths[name] = str(Path(value).expanduser().resolve())
    return replace(cfg, **paths)


def rows_hash(rows) -> str:
    """blake2b of the tokenized training rows (prompt ids, completion ids, label), in order.
    Content, not a file: the same for every source (file, folder, parquet, hub id, rows given
    to the Python API), and it also changes when the tokenizer or truncation does."""
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(repr((r.prompt_ids, r.completion_ids, bool(r.label))).encode())
    return h.hexdigest()


def setup_hash(cfg: KTOConfig) -> str:
    """blake2b of the SETUP_FIELDS that are not paths (a model may sit at another path on
    each host of a distributed run): equal on ranks that train the same way."""
    values = [(k, getattr(cfg, k)) for k in SETUP_FIELDS if k not in PATH_FIELDS]
    return hashlib.blake2b(repr(values).encode(), digest_size=16).hexdigest()


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
    newer = [c for c in list_checkpoints(run_dir) if c.name > ckpt.name]
    if run_dir_of(ckpt).resolve() == run_dir.resolve() and newer:
        raise UserError(
            f"resume: {run_dir} has checkpoints newer than {ckpt.name} ({newer[-1].name}); "
            f"resume from the run folder (its newest checkpoint), or branch off with "
            f"--adapter-path NEW_FOLDER"
        )
