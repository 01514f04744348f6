"""Score a trained adapter on labelled feedback: KTO loss, rewards, margins, accuracy.

`mlx-kto eval` evaluates the way the run trained: the settings that decide the numbers
(beta, weights with `auto` resolved, max_length, loss type, dtype, quantization, seed,
batch size, the starting adapter) come from the run folder's kto_config.json (else the
`kto` block of adapter_config.json), and flags override them. The trainer's final eval
and `mlx-kto eval` on the same split then report the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_kto.config.core import KTOConfig, make_config
from mlx_kto.data.pairs import find_pairs
from mlx_kto.data.rows import load_splits
from mlx_kto.data.tokenize import auto_desirable_weight, class_counts
from mlx_kto.errors import UserError
from mlx_kto.model.load import load_base, load_init_adapter, trainable_lora
from mlx_kto.reference.scorer import make_scorer
from mlx_kto.train.loop import evaluate
from mlx_kto.train.run import tokenize_split

import mlx.core as mx
from mlx.utils import tree_unflatten

# Run settings that change evaluation numbers (or where the data/model/cache are).
RUN_FIELDS = (
    "model",
    "data",
    "loss_type",
    "beta",
    "desirable_weight",
    "undesirable_weight",
    "max_length",
    "max_prompt_length",
    "batch_size",
    "seed",
    "dtype",
    "quantize",
    "q_group_size",
    "init_adapter",
    "pad_multiple",
    "eval_batches",
    "trust_remote_code",
    "ref_cache",
    "no_ref_cache",
)
SPLITS = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}


def run_settings(adapter_path: str | Path) -> dict:
    """The run's saved settings: kto_config.json beside the adapter, else the `kto` block
    of adapter_config.json, else {} (an adapter from another tool)."""
    folder = Path(adapter_path)
    for name, pick in (("kto_config.json", None), ("adapter_config.json", "kto")):
        path = folder / name
        if not path.is_file():
            continue
        try:
            saved = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"--adapter-path: {path} is not valid JSON ({e})") from None
        if pick is not None:
            saved = saved.get(pick) if isinstance(saved, dict) else None
        if isinstance(saved, dict):
            return {k: saved[k] for k in RUN_FIELDS if saved.get(k) is not None}
    return {}


def eval_config(adapter_path: str | Path, **flags) -> KTOConfig:
    """defaults < the run's saved settings < flags given (None = not given)."""
    values = run_settings(adapter_path)
    saved_data = values.get("data")
    if flags.get("data") is None and saved_data and not Path(saved_data).exists():
        raise UserError(
            f"--data: not given, and the run's data {saved_data} is not found from here"
        )
    values.update({k: v for k, v in flags.items() if v is not None})
    if not values.get("model"):
        raise UserError(f"--model: not given and {adapter_path} records no base model")
    if not values.get("data"):
        raise UserError(f"--data: not given and {adapter_path} records no data")
    return make_config(None, **values)


def _load_trained_weights(model, adapter_path: Path) -> None:
    """Put adapters.safetensors onto LoRA layers already in place (same keys, same shapes)."""
    wfile = adapter_path / "adapters.safetensors"
    try:
        weights = mx.load(str(wfile))
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"--adapter-path: {wfile} is unreadable ({e})") from None
    expected = trainable_lora(model)
    bad = sorted(
        k for k in set(expected) | set(weights)
        if k not in expected or k not in weights or expected[k].shape != weights[k].shape
    )  # fmt: skip
    if bad:
        raise UserError(
            f"--adapter-path: {wfile} does not match the starting adapter's layers "
            f"({len(bad)} tensors differ, e.g. {bad[0]})"
        )
    model.update(tree_unflatten(list(weights.items())))


def evaluate_adapter(cfg: KTOConfig, adapter_path: str | Path, split: str = "valid") -> dict:
    """Evaluate `adapter_path` on `split` of cfg.data (valid falls back to the only split
    of a file). The reference is what training used: the base model (adapter off), or
    the run's starting adapter (cfg.init_adapter), frozen. Reward accuracy = share of
    rows whose reward sign matches the label."""
    if split not in SPLITS:
        raise UserError(f"--split: '{split}' is not one of {', '.join(SPLITS)}")
    name = SPLITS[split]
    adapter_path = Path(adapter_path)
    if not (adapter_path / "adapters.safetensors").is_file():
        raise UserError(f"--adapter-path: {adapter_path} has no adapters.safetensors")
    cfg.validate()
    if not cfg.data:
        raise UserError("--data: no data given")
    splits = load_splits(cfg.data, seed=cfg.seed)
    if name not in splits:
        if name == "valid" and set(splits) == {"train"} and Path(cfg.data).is_file():
            name = "train"  # a single file: it is the only split
        else:
            raise UserError(
                f"--split: no {split} split in {cfg.data} (found: {', '.join(sorted(splits))})"
            )
    model, tokenizer, model_path, _ = load_base(cfg)
    frozen = None
    if cfg.init_adapter:  # trained from an adapter: it is the reference, then our weights
        load_init_adapter(model, cfg.init_adapter, what="init_adapter (from the run config)")
        frozen = {k: mx.array(v) for k, v in trainable_lora(model).items()}
        _load_trained_weights(model, adapter_path)
    else:
        load_init_adapter(model, adapter_path, what="--adapter-path")
    model.eval()
    mx.eval(model.parameters())
    quiet = lambda *_: None  # noqa: E731
    rows = tokenize_split(cfg, name, splits[name], tokenizer, quiet)
    dw = cfg.desirable_weight
    if dw == "auto":  # an older run folder: resolve as training did, from the train split
        train_rows = rows if name == "train" else tokenize_split(
            cfg, "train", splits["train"], tokenizer, quiet
        )  # fmt: skip
        dw = auto_desirable_weight(*class_counts(train_rows), cfg.undesirable_weight)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = make_scorer(cfg, model, frozen, model_path, log=quiet)
    out = evaluate(model, rows, cfg, scorer, float(dw), cfg.eval_batches, pad_id)
    out["rows"] = len(rows)
    if cfg.loss_type in ("dpo", "ipo"):  # rows are the two sides of each pair
        out["pairs"] = len(find_pairs(rows)[0])
    out["split"] = name
    return out
