"""Resumable checkpoints: adapter, optimizer state, step, data position, RNG.

The RNG needs no file: the trainer reseeds MLX's generator from (seed, step) at
every step, so the stored seed and step determine it.

A checkpoint is a folder `checkpoints/step_0000100/` written to a temporary
folder first and renamed into place, so a crash never leaves a half checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.model.load import all_finite, trainable_lora
from mlx_kto.runtime.atomic import (
    check_safetensors_size,
    chmod_like_new,
    clean_stale_temps_in,
    describe_os_error,
    temp_path,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

STATE_FILE = "trainer_state.json"
STATE_KEYS = {"step": int, "epoch": int, "batch": int, "config": dict}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: optim.Optimizer,
    state: dict,
    adapter_config: dict,
    keep: int = 0,
) -> Path:
    """Write checkpoints/step_{step:07d} atomically; prune to the newest `keep`.

    Non-finite weights or optimizer state are never written (and so never prune a finite
    checkpoint); a write error (disk full, read-only) is one line naming the folder."""

    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    weights = trainable_lora(model)
    opt_state = dict(tree_flatten(optimizer.state))
    if not (all_finite(weights) and all_finite(opt_state)):
        raise UserError(
            f"checkpoint: not writing {final}: the adapter or optimizer state is not finite "
            "(training diverged; lower --learning-rate)"
        )
    try:
        _write_checkpoint(root, final, step, weights, opt_state, state, adapter_config)
    except OSError as e:  # the checkpoint, not the temp folder it was written in
        raise UserError(describe_os_error(final, e)) from None
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(root, final, step, weights, opt_state, state, adapter_config) -> None:
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_temps_in(root)  # half-written checkpoints of killed runs
    tmp = temp_path(final)
    tmp.mkdir()  # 0777 & ~umask (mkdtemp's 0700 would be published by the rename)
    try:
        for name, arrays in (("adapters", weights), ("optimizer", opt_state)):
            save_safetensors(tmp / f"{name}.safetensors", arrays)
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2) + "\n")
        for f in tmp.iterdir():
            chmod_like_new(f)  # MLX creates files 0644 whatever the umask
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors(path: Path, arrays: dict) -> None:
    """mx.save_safetensors, its failures as OSError: MLX raises RuntimeError when the disk
    fills (`[write] Unable to write N bytes to file.`) and says nothing of a short write."""
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:
        full = "Unable to write" in str(e)
        raise OSError(errno.ENOSPC if full else errno.EIO, f"{e}".strip()) from None
    check_safetensors_size(path)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints under run_dir, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists())


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest checkpoint of a run folder."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"resume: {path} holds no checkpoint ({STATE_FILE} not found)")
    return found[-1]


def read_state(ckpt: str | Path) -> dict:
    """A checkpoint's trainer_state.json, checked: a missing, empty, corrupt or incomplete
    file is one line naming it."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"resume: {path} is unreadable ({e.strerror or e})") from None
    except ValueError as e:
        what = "empty" if not path.read_bytes().strip() else f"not valid JSON ({e})"
        raise UserError(f"resume: {path} is {what}") from None
    if not isinstance(state, dict):
        raise UserError(f"resume: {path} is not a JSON object")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise UserError(f"resume: {path} lacks '{key}' (or it is not a {kind.__name__})")
    return state


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: optim.Optimizer) -> dict:
    """Restore adapter weights and optimizer state; return the trainer state."""
    state = read_state(ckpt)
    try:
        weights = mx.load(str(ckpt / "adapters.safetensors"))
        opt_state = mx.load(str(ckpt / "optimizer.safetensors"))
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"resume: {ckpt} is unreadable ({e})") from None
    expected = trainable_lora(model)
    bad = [
        k
        for k in set(expected) | set(weights)
        if k not in expected or k not in weights or expected[k].shape != weights[k].shape
    ]
    if bad:
        raise UserError(
            f"resume: {ckpt} does not match this model/LoRA setup ({len(bad)} tensors differ, "
            f"e.g. {sorted(bad)[0]})"
        )
    model.update(tree_unflatten(list(weights.items())))
    optimizer.state = tree_unflatten(list(opt_state.items()))
    mx.eval(model.parameters(), optimizer.state)
    return state
