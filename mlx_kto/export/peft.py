"""mlx-lm adapters <-> Hugging Face PEFT LoRA folders (no torch needed).

mlx-lm:  y = W x + s * (x @ lora_a) @ lora_b,      lora_a [in, r], lora_b [r, out]
PEFT:    y = W x + (alpha / r) * B (A x),          A [r, in],      B [out, r]
         (rsLoRA: alpha / sqrt(r); rank_pattern / alpha_pattern: per-module r, alpha)
So A = lora_a.T, B = lora_b.T, alpha = s * r. DoRA's magnitude `m` [out] is PEFT's
`lora_magnitude_vector`. Keys: `base_model.model.<module path>.lora_A.weight`.
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from pathlib import Path

from mlx_kto.errors import UserError
from mlx_kto.export._io import atomic_write, atomic_write_json, prepare_out_dir, read_json_object
from mlx_kto.export.adapters import (
    LoraModule,
    MlxAdapter,
    block_prefix,
    module_sort_key,
    read_adapter,
    split_block_path,
    write_adapter,
)
from mlx_kto.export.base import check_adapter, load_base, resolve_local

import mlx.core as mx

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."

# PEFT options that change the forward pass and that an mlx-lm LoRA adapter cannot hold.
_REFUSED = {
    "modules_to_save": "full trained copies of modules cannot live in an mlx-lm LoRA adapter; "
    "merge with PEFT's merge_and_unload() and convert the merged model with hf-to-mlx",
    "bias": "trained biases (bias != 'none') are not LoRA tensors",
    "lora_bias": "a bias on lora_B is not supported by mlx-lm",
    "fan_in_fan_out": "Conv1D (GPT-2 style, fan_in_fan_out) weights are not supported",
    "layer_replication": "layer replication is not supported",
    "target_parameters": "LoRA on raw parameters (e.g. MoE experts) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported by mlx-lm",
    "use_qalora": "QALoRA's pooled inputs are not supported by mlx-lm",
    "use_bdlora": "block-diagonal LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
}
# Options that only affect initialisation, bookkeeping or which modules PEFT wraps (we
# take the modules from the tensors), or that we convert exactly.
_HANDLED = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules",
    "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "use_rslora", "use_dora", "init_lora_weights", "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "runtime_config",
    "qalora_group_size", "ensure_weight_tying",
}  # fmt: skip
# Initialisations that rewrite the base weights (W_res = W - s*B0*A0): the saved adapter
# only works on that residual base unless PEFT converted it at save time.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _is_default(v) -> bool:
    return v is None or v is False or v == "none" or v == "" or v == [] or v == {}


def alpha_for_scale(scale: float, r: int) -> float | int:
    """`lora_alpha = scale * r`, nudged by an ulp when that makes PEFT's `alpha / r` equal
    `scale` exactly (for some pairs, e.g. 0.1 and 6, no float alpha does: PEFT is then
    off by one ulp and `scale_for_alpha` still recovers `scale`)."""
    alpha = scale * r
    for cand in (alpha, math.nextafter(alpha, math.inf), math.nextafter(alpha, -math.inf)):
        if cand / r == scale:
            alpha = cand
            break
    return int(alpha) if float(alpha).is_integer() else alpha


def scale_for_alpha(alpha: float, r: int, rslora: bool = False) -> float:
    """PEFT's scaling `alpha / r` (`alpha / sqrt(r)` with rsLoRA). Without rsLoRA it is
    returned as the float with the shortest decimal form within 2 ulps that maps back to
    the same alpha: 0.1 rather than 0.10000000000000002 (no alpha gives alpha / 6 == 0.1
    exactly), so mlx -> PEFT -> mlx keeps the scale that was written."""
    s = alpha / (math.sqrt(r) if rslora else r)
    if rslora:
        return s
    for digits in range(1, 18):
        c = float(f"{s:.{digits}g}")
        if abs(c - s) <= 2 * math.ulp(s) and alpha_for_scale(c, r) == alpha:
            return c
    return s


def _peft_targets(paths: list[str]) -> tuple[list[str], list[int] | None]:
    """target_modules / layers_to_transform that select exactly `paths` in PEFT: block-
    relative paths + layer indices when every module sits in the same `...layers.N.`
    list, else the full module names (PEFT matches those exactly)."""
    blocks = [split_block_path(p) for p in paths]
    prefixes = {block_prefix(p) for p in paths}
    # PEFT finds the layer index with r".*?\.[^.]*\.(\d+)\.": the prefix needs a dot.
    if all(blocks) and len(prefixes) == 1 and "." in next(iter(prefixes)):
        rels = sorted({b[1] for b in blocks})
        layers = sorted({b[0] for b in blocks})
        if len(rels) * len(layers) == len(paths):  # a full grid: nothing extra gets wrapped
            return rels, layers
    return sorted(paths), None


def to_peft(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an mlx-lm adapter folder to a PEFT LoRA folder (`adapter_model.safetensors`
    + `adapter_config.json`) that `peft.PeftModel.from_pretrained` loads.

    `base` is the Hugging Face model for `base_model_name_or_path` (default: the adapter's
    `model`); when it is available locally, names and shapes are checked against it.
    """
    ad = read_adapter(adapter_dir)
    base_ref = base or ad.model
    if not base_ref:
        raise UserError(f"{adapter_dir}: adapter_config.json has no 'model'; pass --base")
    if resolve_local(base_ref) is not None:
        info = load_base(base_ref, what="--base" if base else "adapter_config.json model")
        if info.quantized:
            raise UserError(
                f"base '{base_ref}' is an MLX-quantized checkpoint; PEFT needs the original "
                "Hugging Face model: pass --base <its hub id or folder>"
            )
        check_adapter(ad, info, where=str(adapter_dir))
    else:
        print(
            f"note: base '{base_ref}' is not available locally; module names and shapes "
            "were not checked against it",
            file=sys.stderr,
        )
        for p in ad.modules:
            if p.rpartition(".")[2] in ("embed_tokens", "wte", "word_embeddings"):
                raise UserError(
                    f"'{p}' looks like an embedding: LoRA on embeddings is not supported"
                )

    state = {}
    for p, mod in ad.modules.items():
        state[f"{PREFIX}{p}.lora_A.weight"] = mx.contiguous(mod.a.T)  # [r, in]
        state[f"{PREFIX}{p}.lora_B.weight"] = mx.contiguous(mod.b.T)  # [out, r]
        if mod.m is not None:
            state[f"{PREFIX}{p}.lora_magnitude_vector"] = mod.m  # [out]
    targets, layers = _peft_targets(list(ad.modules))
    inputs = (adapter_dir,)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_ref,
        "r": ad.rank,
        "lora_alpha": alpha_for_scale(ad.scale, ad.rank),
        "lora_dropout": ad.dropout,
        "target_modules": targets,
        "layers_to_transform": layers,
        "layers_pattern": None,
        "bias": "none",
        "use_rslora": False,
        "use_dora": ad.fine_tune_type == "dora",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = prepare_out_dir(out_dir, overwrite, inputs)
    atomic_write(
        out / PEFT_WEIGHTS,
        lambda p: mx.save_safetensors(str(p), state, metadata={"format": "pt"}),
        suffix=".safetensors",
    )
    atomic_write_json(out / PEFT_CONFIG, config)
    return out


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (`peft.utils.other.get_pattern_key`):
    the first key `k` with `re.match(rf"(.*\\.)?({k})$", module)` wins."""
    for key, val in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


def _check_peft_config(cfg: dict, conf: Path) -> None:
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"{conf}: peft_type is {cfg.get('peft_type')!r}, only 'LORA' converts")
    for key, why in _REFUSED.items():
        if not _is_default(cfg.get(key)):
            raise UserError(f"{conf}: {key}={cfg[key]!r}: {why}")
    for key, val in cfg.items():
        if key not in _HANDLED and key not in _REFUSED and not _is_default(val):
            raise UserError(
                f"{conf}: unknown PEFT option {key}={val!r}; refusing rather than ignoring it"
            )
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise UserError(
            f"{conf}: init_lora_weights={init!r} adapters only work on PEFT's modified "
            "(residual) base; save them with path_initial_model_for_weight_conversion first"
        )
    for key in ("r", "lora_alpha"):
        v = cfg.get(key)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise UserError(f"{conf}: {key} must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise UserError(f"{conf}: {key} must be an object")


def read_peft(peft_dir: str | Path) -> tuple[dict, dict[str, dict[str, mx.array]]]:
    """The PEFT config and its tensors grouped by module path (A, B, magnitude)."""
    peft_dir = Path(peft_dir)
    conf = peft_dir / PEFT_CONFIG
    if not conf.is_file():
        raise UserError(f"{peft_dir}: no {PEFT_CONFIG} (not a PEFT adapter folder)")
    wfile = peft_dir / PEFT_WEIGHTS
    if not wfile.is_file():
        if (peft_dir / "adapter_model.bin").exists():
            raise UserError(
                f"{peft_dir / 'adapter_model.bin'}: pickled PyTorch files can run code when "
                "loaded, only safetensors are read; re-save with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise UserError(f"{peft_dir}: no {PEFT_WEIGHTS}")
    cfg = read_json_object(conf)
    _check_peft_config(cfg, conf)
    try:
        tensors = mx.load(str(wfile))
    except Exception as e:
        raise UserError(f"{wfile}: cannot read safetensors ({e})") from None

    # PEFT (save_embedding_layers, on by default when lm_head is a target) also stores the
    # frozen base weight of such modules as `<module>.base_layer.weight`: a copy, no LoRA.
    suffixes = {
        ".lora_A.weight": "A",
        ".lora_B.weight": "B",
        ".lora_magnitude_vector": "m",
        ".base_layer.weight": "base_weight",
        ".base_layer.bias": "base_bias",
    }
    modules: dict[str, dict[str, mx.array]] = {}
    for name, t in tensors.items():
        leaf = next((s for s in suffixes if name.endswith(s)), None)
        if "lora_embedding_" in name:
            raise UserError(f"{wfile}: '{name}': LoRA on embeddings is not supported")
        if leaf is None or not name.startswith(PREFIX):
            raise UserError(
                f"{wfile}: tensor '{name}' is not a LoRA A/B/magnitude tensor of the form "
                f"{PREFIX}<module>.lora_A.weight (a full weight from modules_to_save, a bias, "
                "or a multi-adapter key)"
            )
        path = name[len(PREFIX) : -len(leaf)]
        modules.setdefault(path, {})[suffixes[leaf]] = t
    for path, d in modules.items():
        if ("base_weight" in d or "base_bias" in d) and "A" not in d and "B" not in d:
            raise UserError(
                f"{wfile}: '{PREFIX}{path}.base_layer.*' is a full weight of a module without "
                "LoRA tensors; only LoRA adapters convert"
            )
    if not modules:
        raise UserError(f"{wfile}: no LoRA tensors")
    return cfg, modules


def _check_base_copies(raw: dict, info, wfile: Path) -> None:
    """PEFT's saved copies of base weights (`<module>.base_layer.weight`) are skipped, as
    llama.cpp's converter does; with a base at hand each must equal the base's weight
    (compared in the lower precision of the two), or the adapter was made for another
    base (or trained that weight) and is refused."""
    copies = {p: d["base_weight"] for p, d in raw.items() if "base_weight" in d}
    if not copies:
        return
    names = ", ".join(f"{p}.base_layer.weight" for p in sorted(copies))
    if info is None or info.quantized:
        why = "no base at hand (pass --base)" if info is None else "the base is quantized"
        print(f"note: skipped PEFT's copies of base weights ({names}); not compared: {why}",
              file=sys.stderr)  # fmt: skip
        return
    stored = _checkpoint_tensors(info.path)
    for p, copy in sorted(copies.items()):
        name = f"{p}.weight"
        if name not in stored and info.config.get("tie_word_embeddings") and p == "lm_head":
            name = "model.embed_tokens.weight"  # tied: the head is the embedding matrix
        if name not in stored:
            raise UserError(f"{wfile}: '{p}.base_layer.weight' has no '{p}.weight' in the base")
        w = stored[name]
        low = min((copy.dtype, w.dtype), key=lambda t: t.size)
        if tuple(copy.shape) != tuple(w.shape) or not mx.array_equal(
            copy.astype(low), w.astype(low)
        ):
            raise UserError(
                f"{wfile}: '{p}.base_layer.weight' (PEFT's copy of the base weight) differs "
                f"from the base's '{name}': the adapter was saved on another base"
            )
    print(f"note: skipped PEFT's copies of base weights ({names}); equal to the base's",
          file=sys.stderr)  # fmt: skip


def _checkpoint_tensors(folder: Path) -> dict[str, mx.array]:
    """Every tensor of a folder's *.safetensors, lazily (mx.load reads on evaluation)."""
    out: dict[str, mx.array] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def from_peft(
    peft_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a PEFT LoRA folder (safetensors only) to an mlx-lm adapter folder.

    Scaling per module is PEFT's: `s_i = alpha_i / r_i` (`alpha_i / sqrt(r_i)` with
    rsLoRA), with `alpha_i`, `r_i` from alpha_pattern / rank_pattern. mlx-lm has one rank
    and one scale, so when they differ: rank R = max r_i (A and B zero-padded, the product
    is unchanged) and scale S = the most common s_i, with `s_i / S` folded into B. `base`
    (default: base_model_name_or_path when local) gives the block count for `num_layers`.
    """
    peft_dir = Path(peft_dir)
    cfg, raw = read_peft(peft_dir)
    conf = peft_dir / PEFT_CONFIG
    wfile = peft_dir / PEFT_WEIGHTS
    dora = bool(cfg.get("use_dora"))
    rslora = bool(cfg.get("use_rslora"))
    r_cfg, alpha_cfg = cfg["r"], cfg["lora_alpha"]
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}

    ranks, scales = {}, {}
    for path, d in raw.items():
        if "A" not in d or "B" not in d:
            raise UserError(f"{wfile}: '{path}' has no lora_{'A' if 'A' not in d else 'B'}")
        A, B = d["A"], d["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(
                f"{wfile}: '{path}' lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are not "
                "[r, in] / [out, r]"
            )
        if dora != ("m" in d):
            raise UserError(
                f"{wfile}: '{path}' "
                + ("has no lora_magnitude_vector but use_dora is true" if dora
                   else "has a lora_magnitude_vector but use_dora is false")
            )  # fmt: skip
        if dora and tuple(d["m"].shape) != (B.shape[0],):
            raise UserError(f"{wfile}: '{path}' lora_magnitude_vector is not [{B.shape[0]}]")
        r_i = int(A.shape[0])
        r_expected = _pattern_value(rank_pat, path, r_cfg)
        if r_i != r_expected:
            raise UserError(
                f"{conf}: '{path}' has rank {r_i} in the tensors but {r_expected} in the config"
            )
        alpha_i = _pattern_value(alpha_pat, path, alpha_cfg)
        ranks[path] = r_i
        scales[path] = scale_for_alpha(alpha_i, r_i, rslora)

    order = sorted(raw, key=module_sort_key)
    R = max(ranks.values())
    S = Counter(scales[p] for p in order).most_common(1)[0][0]
    modules = {}
    for p in order:
        a, b = raw[p]["A"].T, raw[p]["B"].T  # [in, r_i], [r_i, out]
        if scales[p] != S:  # fold s_i / S into B (in float32)
            b = b.astype(mx.float32) * (scales[p] / S)
        if ranks[p] < R:  # zero rank padding: (x a) b is unchanged
            pad = R - ranks[p]
            a = mx.concatenate([a, mx.zeros((a.shape[0], pad), a.dtype)], axis=1)
            b = mx.concatenate([b, mx.zeros((pad, b.shape[1]), b.dtype)], axis=0)
        modules[p] = LoraModule(p, mx.contiguous(a), mx.contiguous(b), raw[p].get("m"))
    if len(set(ranks.values())) > 1 or len(set(scales.values())) > 1:
        print(
            f"note: per-module ranks/scales ({sorted(set(ranks.values()))} / "
            f"{sorted(set(scales.values()))}) mapped to rank {R}, scale {S}: zero-padded and "
            "scale ratios folded into lora_b (same outputs)",
            file=sys.stderr,
        )

    base_ref = base or cfg.get("base_model_name_or_path")
    info = None
    if base_ref and (base or resolve_local(base_ref) is not None):
        info = load_base(base_ref, what="--base" if base else f"{conf} base_model_name_or_path")
    blocks = [split_block_path(p) for p in order]
    idx = [b[0] for b in blocks if b]
    keys = sorted({b[1] for b in blocks if b}) + [
        p for p, b in zip(order, blocks, strict=True) if not b
    ]
    if not idx:
        num_layers = 0  # only top-level modules (e.g. lm_head); no block is touched
    elif info is not None:
        num_layers = info.n_layers - min(idx)
    elif min(idx) == 0:
        num_layers = -1  # every block: mlx-lm reads -1 as "all"
    else:
        raise UserError(
            f"{conf}: the LoRA starts at block {min(idx)} and mlx-lm counts blocks from the "
            "end; pass --base so the block count is known"
        )
    ad = MlxAdapter(
        fine_tune_type="dora" if dora else "lora",
        num_layers=num_layers,
        rank=R,
        scale=S,
        dropout=float(cfg.get("lora_dropout") or 0.0),
        keys=keys,
        model=base_ref,
        modules=modules,
    )
    if info is not None:
        check_adapter(ad, info, where=str(peft_dir))
    _check_base_copies(raw, info, wfile)
    out = prepare_out_dir(out_dir, overwrite, (peft_dir,))
    write_adapter(ad, out)
    return out
