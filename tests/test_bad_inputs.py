"""Bad inputs end in one line naming the flag/field/file, exit 2, and lose nothing.

Each case runs the CLI in-process through `mlx_kto.cli.app.run` (what `mlx-kto` runs) in a
fresh folder holding files a user already has (data, a model copy, an adapter, outputs
of earlier conversions). After the failure: exit status 2, exactly one `error:` line
on stderr naming what to fix, no traceback, and every file that existed before is
byte-identical, with no new file (no half-written output, no stray temp file).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from mlx_kto.cli.app import cli, run

import pytest

ROWS = [
    {"prompt": f"Tell me about the sky {i}.", "completion": c, "label": i % 2 == 0}
    for i, c in enumerate([" Sure, it is blue.", " Go away.", " Of course!", " No."] * 3)
]


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    from adapter_fixtures import make_adapter

    out, _ = make_adapter(tiny_llama, tmp_path_factory.mktemp("bad_inputs") / "adapter")
    return out


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# -- the user's folder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Another base: the tiny Llama's family and depth, hidden size 96 instead of 64."""
    from toy import build_model

    return build_model(
        tmp_path_factory.mktemp("wide"), family="llama", seed=2, hidden_size=96,
        intermediate_size=192,
    )  # fmt: skip


@pytest.fixture
def world(tmp_path, tiny_llama, tiny_qwen2, adapter, wide):
    """A folder with what a user has: data, a model copy, adapters, earlier outputs."""
    w = tmp_path
    _jsonl(w / "data.jsonl", ROWS)
    (w / "folder").mkdir()
    _jsonl(w / "folder" / "train.jsonl", ROWS)
    (w / "a_file").write_text("not a folder\n")
    shutil.copytree(adapter, w / "adapter")
    (w / "old.gguf").write_bytes(b"an earlier conversion\n")
    (w / "peft_out").mkdir()
    (w / "peft_out" / "adapter_model.safetensors").write_bytes(b"earlier weights\n")
    return {
        "w": w,
        "model": tiny_llama,
        "qwen": tiny_qwen2,
        "wide": wide,
    }


def _copy_model(world, name="m") -> Path:
    dst = world["w"] / name
    shutil.copytree(world["model"], dst)
    return dst


# Setup hooks: change the world for one case, before the snapshot.
def _trunc_model(world):
    _truncate(_copy_model(world) / "model.safetensors")


def _garbage_model(world):
    (_copy_model(world) / "model.safetensors").write_bytes(b"garbage" * 100)


def _empty_model(world):
    (_copy_model(world) / "model.safetensors").write_bytes(b"")


def _bad_config(world):
    (_copy_model(world) / "config.json").write_text("{not json")


def _no_config(world):
    (_copy_model(world) / "config.json").unlink()


def _trunc_adapter(world):
    _truncate(world["w"] / "adapter" / "adapters.safetensors")


def _garbage_adapter(world):
    (world["w"] / "adapter" / "adapters.safetensors").write_bytes(b"\x00" * 64)


def _no_weights(world):
    (world["w"] / "adapter" / "adapters.safetensors").unlink()


def _bad_adapter_config(world):
    (world["w"] / "adapter" / "adapter_config.json").write_text("{oops")


def _completion(text):
    def setup(world):
        rows = [dict(r) for r in ROWS]
        rows[1]["completion"] = text
        _jsonl(world["w"] / "data.jsonl", rows)

    return setup


_ws_completion = _completion(" \n\t ")
_ws_newline = _completion("\n\n")


def _ws_chat(world):
    rows = [dict(r) for r in ROWS]
    rows[1] = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "   "},
        ],
        "label": True,
    }
    _jsonl(world["w"] / "data.jsonl", rows)


def _ws_paired(world):
    _jsonl(world["w"] / "data.jsonl", [{"prompt": "p", "chosen": " a", "rejected": "  "}])


def _bad_label(world):
    rows = [dict(r) for r in ROWS]
    rows[1]["label"] = "maybe"
    _jsonl(world["w"] / "data.jsonl", rows)


def _bad_json_line(world):
    p = world["w"] / "data.jsonl"
    p.write_text(p.read_text() + "{broken\n")


def _write(rel, data: bytes):
    def setup(world):
        if rel.startswith("m/"):
            _copy_model(world)
        path = world["w"] / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def _yaml(text):
    def setup(world):
        (world["w"] / "c.yaml").write_text(_fill(text, world))

    return setup


def _enospc_gguf(world, monkeypatch):
    import gguf

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)


def _enospc_mlx_save(world, monkeypatch):
    import mlx.core as mx

    real = mx.save_safetensors

    def full(path, arrays, *a, **k):  # writes part of the file, then fails as MLX does
        real(path, arrays, *a, **k)
        _truncate(Path(path), 0.3)
        raise RuntimeError("[write] Unable to write 4096 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full)


def _run_folder(world):
    """A training run's folder with two metrics records (what `plot` reads)."""
    run = world["w"] / "run"
    run.mkdir()
    _jsonl(run / "metrics.jsonl", [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}])


def _empty_stdin(world, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def _earlier_compare(world):
    (world["w"] / "report").mkdir()
    (world["w"] / "report" / "compare.json").write_text("{}\n")


COMPARE = ["compare", "--model", "{model}", "--data", "{w}/data.jsonl", "--samples", "1",
           "--max-tokens", "2", "-o", "{w}/cmp"]  # fmt: skip
GENERATE = ["generate", "--model", "{model}", "-p", "hi", "-m", "2"]

TRAIN = ["train", "--model", "{model}", "--data", "{w}/data.jsonl", "--adapter-path", "{w}/run",
         "--iters", "2", "--quiet", "--max-length", "32"]  # fmt: skip

# (id, args, needles that the error line must contain, setup, env)
CASES = [
    # -- values accepted silently before: each names the flag --------------------------
    ("q-group-size-7", [*TRAIN, "--quantize", "4", "--q-group-size", "7"], ["--q-group-size"]),
    ("q-group-size-16", [*TRAIN, "--quantize", "4", "--q-group-size", "16"], ["--q-group-size"]),
    ("q-group-size-does-not-divide", [*TRAIN, "--quantize", "4", "--q-group-size", "128"],
     ["--q-group-size", "not a multiple of 128", "use --q-group-size 64"]),
    ("quantize-7", [*TRAIN, "--quantize", "7"], ["--quantize", "7"]),
    ("quantize-0", [*TRAIN, "--quantize", "0"], ["--quantize"]),
    ("quantize-1", [*TRAIN, "--quantize", "1"], ["--quantize"]),
    ("lora-alpha-0", [*TRAIN, "--lora-alpha", "0"], ["--lora-alpha", "> 0"]),
    ("lora-alpha-neg", [*TRAIN, "--lora-alpha", "-4"], ["--lora-alpha"]),
    ("lora-scale-0", [*TRAIN, "--lora-scale", "0"], ["--lora-scale"]),
    ("warmup-neg", [*TRAIN, "--warmup-steps", "-1"], ["--warmup-steps", ">= 0"]),
    ("max-grad-norm-neg", [*TRAIN, "--max-grad-norm", "-1"], ["--max-grad-norm"]),
    ("weight-decay-neg", [*TRAIN, "--weight-decay", "-0.1"], ["--weight-decay"]),
    ("steps-per-save-neg", [*TRAIN, "--steps-per-save", "-5"], ["--steps-per-save"]),
    ("pad-multiple-0", [*TRAIN, "--pad-multiple", "0"], ["--pad-multiple"]),
    ("seed-neg", [*TRAIN, "--seed", "-1"], ["--seed"]),
    ("seed-huge", [*TRAIN, "--seed", str(2**32)], ["--seed"]),
    ("steps-per-report-0", [*TRAIN, "--steps-per-report", "0"], ["--steps-per-report"]),
    ("steps-per-eval-neg", [*TRAIN, "--steps-per-eval", "-1"], ["--steps-per-eval"]),
    ("keep-checkpoints-neg", [*TRAIN, "--keep-checkpoints", "-1"], ["--keep-checkpoints"]),
    ("eval-batches-0", [*TRAIN, "--eval-batches", "0"], ["--eval-batches"]),
    ("num-layers-0", [*TRAIN, "--num-layers", "0"], ["--num-layers"]),
    ("num-layers-neg", [*TRAIN, "--num-layers", "-2"], ["--num-layers"]),
    ("lora-rank-0", [*TRAIN, "--lora-rank", "0"], ["--lora-rank"]),
    ("epochs-0", [*TRAIN, "--epochs", "0"], ["--epochs"]),
    ("iters-0", [*TRAIN, "--iters", "0"], ["--iters"]),
    ("grad-accum-0", [*TRAIN, "--grad-accumulation-steps", "0"], ["--grad-accumulation-steps"]),
    ("max-length-1", [*TRAIN, "--max-length", "1"], ["--max-length"]),
    ("max-prompt-length-0", [*TRAIN, "--max-prompt-length", "0"], ["--max-prompt-length"]),
    ("batch-size-0", [*TRAIN, "--batch-size", "0"], ["--batch-size"]),
    ("batch-size-1-kto", [*TRAIN, "--batch-size", "1"], ["--batch-size", "apo_zero_unpaired"]),
    ("beta-0", [*TRAIN, "--beta", "0"], ["--beta"]),
    ("beta-nan", [*TRAIN, "--beta", "nan"], ["--beta", "finite"]),
    ("lr-0", [*TRAIN, "--learning-rate", "0"], ["--learning-rate"]),
    ("lr-inf", [*TRAIN, "--learning-rate", "inf"], ["--learning-rate", "finite"]),
    ("desirable-weight-neg", [*TRAIN, "--desirable-weight", "-1"], ["--desirable-weight"]),
    ("desirable-weight-word", [*TRAIN, "--desirable-weight", "lots"], ["--desirable-weight"]),
    ("undesirable-weight-0", [*TRAIN, "--undesirable-weight", "0"], ["--undesirable-weight"]),
    ("lora-dropout-1", [*TRAIN, "--lora-dropout", "1"], ["--lora-dropout"]),
    ("loss-type", [*TRAIN, "--loss-type", "orpo"], ["--loss-type", "orpo"]),
    ("loss-type-dpo-unpaired", [*TRAIN, "--loss-type", "dpo"], ["data.jsonl:1", "paired"]),
    ("lr-schedule", [*TRAIN, "--lr-schedule", "step"], ["--lr-schedule", "step"]),
    ("dtype", [*TRAIN, "--dtype", "float8"], ["--dtype", "float8"]),
    ("lora-keys-empty", [*TRAIN, "--lora-keys", ","], ["--lora-keys"]),
    ("cache-limit-neg", [*TRAIN, "--cache-limit-mb", "-1"], ["--cache-limit-mb"]),
    ("wired-limit-0", [*TRAIN, "--wired-limit-mb", "0"], ["--wired-limit-mb"]),
    # -- the same checks from a YAML file name the field ---------------------------------
    ("yaml-q-group-size", ["train", "-c", "{w}/c.yaml"], ["q_group_size"],
     _yaml("model: {model}\ndata: {w}/data.jsonl\nquantize: 4\nq_group_size: 7\n")),
    ("yaml-seed", ["train", "-c", "{w}/c.yaml"], ["seed"],
     _yaml("model: {model}\ndata: {w}/data.jsonl\nseed: -1\n")),
    ("yaml-steps-per-report", ["train", "-c", "{w}/c.yaml"], ["steps_per_report"],
     _yaml("model: {model}\ndata: {w}/data.jsonl\nsteps_per_report: 0\n")),
    ("yaml-bad-type", ["train", "-c", "{w}/c.yaml"], ["c.yaml", "batch_size"],
     _yaml("model: {model}\ndata: {w}/data.jsonl\nbatch_size: many\n")),
    # -- LoRA keys that match nothing (mlx-lm drops them silently) --------------------
    ("lora-keys-tied-lm-head",
     ["train", "--model", "{qwen}", "--data", "{w}/data.jsonl", "--adapter-path", "{w}/run",
      "--lora-keys", "self_attn.q_proj,lm_head", "--quiet"],
     ["--lora-keys", "lm_head", "ties its embeddings"]),
    ("lora-keys-unknown", [*TRAIN, "--lora-keys", "self_attn.q_proj,self_attn.bogus"],
     ["--lora-keys", "self_attn.bogus"]),
    ("init-adapter-not-adapter", [*TRAIN, "--init-adapter", "{w}/folder"], ["--init-adapter"]),
    ("init-adapter-truncated", [*TRAIN, "--init-adapter", "{w}/adapter"],
     ["--init-adapter", "adapters.safetensors"], _trunc_adapter),
    ("init-adapter-bad-config", [*TRAIN, "--init-adapter", "{w}/adapter"],
     ["--init-adapter", "adapter_config.json"], _bad_adapter_config),
    ("cache-clear-unknown-model", ["cache", "clear", "--model", "nobody/nothing",
                                   "--ref-cache", "{w}/cache"], ["--model", "nobody/nothing"]),
    ("num-layers-too-many", [*TRAIN, "--num-layers", "99"], ["--num-layers", "99"]),
    # -- data --------------------------------------------------------------------------
    ("whitespace-completion", TRAIN, ["data.jsonl:2", "completion"], _ws_completion),
    ("newline-completion", TRAIN, ["data.jsonl:2", "completion"], _ws_newline),
    ("whitespace-chat-reply", TRAIN, ["data.jsonl:2", "empty"], _ws_chat),
    ("whitespace-rejected", TRAIN, ["data.jsonl:1", "rejected"], _ws_paired),
    ("bad-label", TRAIN, ["data.jsonl:2", "label"], _bad_label),
    ("bad-json-line", TRAIN, ["data.jsonl:13", "invalid JSON"], _bad_json_line),
    ("data-missing", [*TRAIN[:4], "{w}/nope.jsonl", *TRAIN[5:]], ["nope.jsonl"]),
    ("data-check-max-prompt-0", ["data", "check", "{w}/data.jsonl", "--max-prompt-length", "0"],
     ["--max-prompt-length"]),
    ("data-check-max-length-1", ["data", "check", "{w}/data.jsonl", "--max-length", "1"],
     ["--max-length"]),
    # -- model files -------------------------------------------------------------------
    ("model-truncated", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["m/model.safetensors"],
     _trunc_model),
    ("model-garbage", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["m/model.safetensors"],
     _garbage_model),
    ("model-empty", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["m/model.safetensors"],
     _empty_model),
    ("model-bad-config", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["m"], _bad_config),
    ("model-no-config", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["config.json"], _no_config),
    ("model-missing", [TRAIN[0], "--model", "{w}/gone", *TRAIN[3:]], ["--model", "gone"]),
    ("generate-truncated-model", ["generate", "--model", "{w}/m", "--prompt", "hi"],
     ["--model", "unreadable"], _trunc_model),
    ("generate-truncated-adapter",
     ["generate", "--model", "{model}", "--adapter-path", "{w}/adapter", "--prompt", "hi"],
     ["--adapter-path"], _trunc_adapter),
    # -- reference cache location ----------------------------------------------------------
    ("train-cache-dir-file", TRAIN, ["MLX_KTO_CACHE_DIR", "a_file", "is a file"], None,
     {"MLX_KTO_CACHE_DIR": "{w}/a_file"}),
    ("train-ref-cache-under-file", [*TRAIN, "--ref-cache", "{w}/a_file/cache"],
     ["--ref-cache", "a_file"]),
    ("cache-info-dir-file", ["cache", "info"], ["MLX_KTO_CACHE_DIR", "a_file"], None,
     {"MLX_KTO_CACHE_DIR": "{w}/a_file"}),
    ("cache-clear-dir-file", ["cache", "clear"], ["MLX_KTO_CACHE_DIR", "a_file"], None,
     {"MLX_KTO_CACHE_DIR": "{w}/a_file"}),
    ("cache-info-under-file", ["cache", "info", "--ref-cache", "{w}/a_file/x"],
     ["--ref-cache", "a_file"]),
    ("cache-warm-dir-file", ["cache", "warm", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["MLX_KTO_CACHE_DIR", "a_file"], None, {"MLX_KTO_CACHE_DIR": "{w}/a_file"}),
    ("cache-warm-bad-value", ["cache", "warm", "--model", "{model}", "--data", "{w}/data.jsonl",
                              "--q-group-size", "7"], ["--q-group-size"]),
    # -- eval --------------------------------------------------------------------------------
    ("eval-truncated-adapter",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["--adapter-path", "adapters.safetensors"], _trunc_adapter),
    ("eval-garbage-adapter",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["--adapter-path", "adapters.safetensors"], _garbage_adapter),
    ("eval-no-weights",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["--adapter-path", "adapters.safetensors"], _no_weights),
    ("eval-bad-adapter-config",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["--adapter-path", "adapter_config.json"], _bad_adapter_config),
    ("eval-no-model", ["eval", "--adapter-path", "{w}/adapter", "--data", "{w}/data.jsonl"],
     ["--model"]),
    ("eval-split-missing",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/folder",
      "--split", "test"], ["--split", "test"]),
    ("eval-beta-0",
     ["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data", "{w}/data.jsonl",
      "--beta", "0"], ["--beta"]),
    ("eval-not-an-adapter",
     ["eval", "--adapter-path", "{w}/folder", "--model", "{model}", "--data", "{w}/data.jsonl"],
     ["--adapter-path"]),
    # -- converters ------------------------------------------------------------------------
    ("gguf-under-file", ["convert", "to-gguf", "{w}/adapter", "{w}/a_file/x.gguf",
                         "--base", "{model}"], ["a_file/x.gguf", "is a file"]),
    ("gguf-disk-full", ["convert", "to-gguf", "{w}/adapter", "{w}/old.gguf", "--base", "{model}",
                        "--overwrite"], ["old.gguf", "No space left"], _enospc_gguf),
    ("gguf-truncated-adapter", ["convert", "to-gguf", "{w}/adapter", "{w}/new.gguf",
                                "--base", "{model}"], ["adapters.safetensors"], _trunc_adapter),
    ("peft-under-file", ["convert", "to-peft", "{w}/adapter", "{w}/a_file/p"], ["a_file"]),
    ("peft-disk-full", ["convert", "to-peft", "{w}/adapter", "{w}/peft_out", "--overwrite"],
     ["peft_out/adapter_model.safetensors", "Unable to write"], _enospc_mlx_save),
    ("from-peft-not-peft", ["convert", "from-peft", "{w}/folder", "{w}/x"], ["folder"]),
    ("fuse-under-file", ["convert", "fuse", "{w}/adapter", "{w}/a_file/fused",
                         "--base", "{model}"], ["a_file"]),
    ("fuse-truncated-base", ["convert", "fuse", "{w}/adapter", "{w}/fused", "--base", "{w}/m"],
     ["--base", "unreadable"], _trunc_model),
    ("hf-to-mlx-missing-abs", ["convert", "hf-to-mlx", "{w}/no_such_model", "{w}/mlx"],
     ["no_such_model", "no such folder"]),
    ("hf-to-mlx-missing-rel", ["convert", "hf-to-mlx", "./no_such_model", "{w}/mlx"],
     ["./no_such_model", "no such folder"]),
    ("hf-to-mlx-missing-nested", ["convert", "hf-to-mlx", "{w}/folder/model", "{w}/mlx"],
     ["folder/model", "no such folder"]),
    ("gguf-adapter-config-not-utf8", ["convert", "to-gguf", "{w}/adapter", "{w}/n.gguf",
                                      "--base", "{model}"], ["adapter_config.json", "UTF-8"],
     _write("adapter/adapter_config.json", b"\xff\xfe{")),
    ("gguf-base-config-list", ["convert", "to-gguf", "{w}/adapter", "{w}/n.gguf", "--base",
                               "{w}/m"], ["m/config.json", "JSON object"],
     _write("m/config.json", b"[1]")),
    ("gguf-base-config-not-utf8", ["convert", "to-gguf", "{w}/adapter", "{w}/n.gguf", "--base",
                                   "{w}/m"], ["m/config.json", "UTF-8"],
     _write("m/config.json", b"\xff\xfe")),
    ("train-model-config-list", [TRAIN[0], "--model", "{w}/m", *TRAIN[3:]], ["m"],
     _write("m/config.json", b"[1]")),
    ("yaml-not-utf8", ["train", "-c", "{w}/c.yaml"], ["c.yaml", "UTF-8"],
     _write("c.yaml", b"\xff\xfe: 1")),
    ("yaml-list", ["train", "-c", "{w}/c.yaml"], ["c.yaml", "mapping"],
     _write("c.yaml", b"- a\n- b\n")),
    ("yaml-unknown-field", ["train", "-c", "{w}/c.yaml"], ["c.yaml", "betta"],
     _write("c.yaml", b"betta: 0.2\n")),
    ("cache-db-is-folder", ["cache", "info", "--ref-cache", "{w}/cache"], ["--ref-cache"],
     _write("cache/reference.sqlite/x", b"")),
    ("hf-to-mlx-out-under-file", ["convert", "hf-to-mlx", "{model}", "{w}/a_file/mlx"],
     ["a_file/mlx", "is a file"]),
    ("hf-to-mlx-out-exists", ["convert", "hf-to-mlx", "{model}", "{w}/folder"], ["folder"]),
    # -- outputs: one check before any work; nothing existing replaced ----------------
    ("compare-out-existing-file", [*COMPARE, "-o", "{w}/a_file"], ["a_file", "not a folder"]),
    ("compare-out-earlier-report", [*COMPARE, "-o", "{w}/report"],
     ["report", "compare.json", "--overwrite"], _earlier_compare),
    ("compare-out-under-file", [*COMPARE, "-o", "{w}/a_file/cmp"], ["a_file", "is a file"]),
    ("plot-out-under-file", ["plot", "{w}/run", "-o", "{w}/a_file/p.png"],
     ["a_file/p.png", "is a file"], _run_folder),
    ("plot-out-existing-file", ["plot", "{w}/run", "-o", "{w}/a_file"],
     ["a_file", "--overwrite"], _run_folder),
    ("plot-out-folder", ["plot", "{w}/run", "-o", "{w}/folder"], ["folder", "is a folder"],
     _run_folder),
    ("plot-metrics-not-utf8", ["plot", "{w}/run"], ["run/metrics.jsonl:2", "UTF-8"],
     _write("run/metrics.jsonl", b'{"step": 1, "loss": 0.5}\n\xff\xfe\n{"step": 2}\n')),
    ("plot-metrics-not-records", ["plot", "{w}/run"], ["run/metrics.jsonl:1", "JSON object"],
     _write("run/metrics.jsonl", b'[1, 2]\n{"step": 1, "loss": 0.5}\n')),
    ("compare-prompts-not-utf8", [*COMPARE[:4], "{w}/p.txt", *COMPARE[5:]], ["p.txt:2", "UTF-8"],
     _write("p.txt", b"Hello\n\xff\xfe\n")),
    ("import-out-folder-force", ["data", "import", "open-webui", "{w}/data.jsonl", "-o",
                                 "{w}/folder", "--force"], ["folder", "is a folder"]),
    ("import-out-under-file", ["data", "import", "open-webui", "{w}/data.jsonl", "-o",
                               "{w}/a_file/r.jsonl"], ["a_file", "is a file"]),
    # -- an adapter of another base: which base it was trained on, what this one is ------
    ("generate-adapter-other-base", [*GENERATE[:2], "{wide}", *GENERATE[3:], "--adapter-path",
                                     "{w}/adapter"],
     ["--adapter-path", "trained on {model}", "this base is {wide} (llama, 2 layers, hidden "
      "size 96)", "adapter tensors do not fit"]),
    ("eval-adapter-other-base", ["eval", "--adapter-path", "{w}/adapter", "--model", "{wide}",
                                 "--data", "{w}/data.jsonl"],
     ["--adapter-path", "trained on {model}", "hidden size 96"]),
    ("compare-adapter-other-base", [*COMPARE[:2], "{wide}", *COMPARE[3:], "--adapter-path",
                                    "{w}/adapter"], ["--adapter-path", "trained on {model}"]),
    # -- sampling settings out of range: refused, never recorded -------------------------
    ("compare-temp-neg", [*COMPARE, "--temp", "-1"], ["--temp", ">= 0"]),
    ("compare-temp-nan", [*COMPARE, "--temp", "nan"], ["--temp"]),
    ("compare-seed-neg", [*COMPARE, "--seed", "-1"], ["--seed"]),
    ("generate-temp-neg", [*GENERATE, "--temp", "-0.5"], ["--temp"]),
    ("generate-top-p-0", [*GENERATE, "--top-p", "0"], ["--top-p", "(0, 1]"]),
    ("generate-top-p-2", [*GENERATE, "--top-p", "2"], ["--top-p"]),
    ("generate-min-p-neg", [*GENERATE, "--min-p", "-0.1"], ["--min-p"]),
    ("generate-top-k-neg", [*GENERATE, "--top-k", "-3"], ["--top-k"]),
    ("generate-max-tokens-0", [*GENERATE, "-m", "0"], ["--max-tokens"]),
    ("generate-seed-neg", [*GENERATE, "--seed", "-1"], ["--seed"]),
    ("chat-temp-nan", ["chat", "--temp", "nan", "--feedback", "{w}/fb.jsonl"], ["--temp"]),
    # -- generating from nothing ---------------------------------------------------------
    ("generate-empty-stdin", [*GENERATE[:4], "-"], ["--prompt -", "stdin was empty"],
     _empty_stdin),
    ("generate-empty-prompt", [*GENERATE[:4], "  "], ["--prompt", "empty"]),
]  # fmt: skip


def _fill(x: str, world) -> str:
    return x.format(w=world["w"], model=world["model"], qwen=world["qwen"], wide=world["wide"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, world, capsys, monkeypatch):
    _, args, needles, *rest = case
    setup = rest[0] if rest else None
    env = rest[1] if len(rest) > 1 else {}
    if setup is not None:  # hooks with a second parameter patch a writer (disk full)
        if setup.__code__.co_argcount == 2:
            setup(world, monkeypatch)
        else:
            setup(world)
    for k, v in env.items():
        monkeypatch.setenv(k, _fill(v, world))
    monkeypatch.chdir(world["w"])
    before = _snapshot(world["w"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(cli, [_fill(a, world) for a in args], "mlx-kto")
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert _fill(needle, world) in lines[0], lines[0]
    after = _snapshot(world["w"])
    assert after == before, sorted(set(after) ^ set(before)) or "a file changed"


def test_enough_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["train", "--model", "{model}", "--data", "{w}/data.jsonl", "--steps-per-report", "0",
          "--quiet"], {}, "--steps-per-report"),
        (["cache", "info"], {"MLX_KTO_CACHE_DIR": "{w}/a_file"}, "MLX_KTO_CACHE_DIR"),
        (["eval", "--adapter-path", "{w}/adapter", "--model", "{model}", "--data",
          "{w}/data.jsonl"], {}, "--adapter-path"),
    ],
    ids=["steps-per-report-0", "cache-dir-file", "eval-truncated"],
)  # fmt: skip
def test_real_process_prints_exactly_one_line(args, env, needle, world):
    """As a user's shell sees it: stderr is one line, exit status 2."""
    import os
    import subprocess
    import sys

    _trunc_adapter(world)
    before = _snapshot(world["w"])
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *[_fill(a, world) for a in args]],
        capture_output=True, text=True, timeout=120, cwd=world["w"],
        env={**os.environ, **{k: _fill(v, world) for k, v in env.items()}},
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert _snapshot(world["w"]) == before


@pytest.mark.parametrize(
    "args, stdin, needle",
    [
        (["generate", "--model", "{model}", "-p", "-"], "", "stdin was empty"),
        (["generate", "--model", "{wide}", "--adapter-path", "{w}/adapter", "-p", "hi"], None,
         "trained on {model}"),
        (["compare", "--model", "{model}", "--data", "{w}/data.jsonl", "-o", "{w}/a_file"], None,
         "a_file"),
    ],
    ids=["generate-empty-stdin", "generate-other-base", "compare-out-file"],
)  # fmt: skip
def test_real_process_outputs_and_inputs_one_line(args, stdin, needle, world):
    """The Outputs / silently-wrong classes as a user's shell sees them: one line, exit 2,
    nothing written (mlx-lm's 30-line tensor list stays out of the way)."""
    import os
    import subprocess
    import sys

    before = _snapshot(world["w"])
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", *[_fill(a, world) for a in args]],
        input=stdin, capture_output=True, text=True, timeout=300, cwd=world["w"],
        env=dict(os.environ), stdin=None if stdin is not None else subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert _fill(needle, world) in lines[0], p.stderr
    assert p.stdout == "" and _snapshot(world["w"]) == before
