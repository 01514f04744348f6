"""adapter_config.json names its base so that fuse / to-peft work from any folder, and
LoRA on embeddings (which no converter can export) is refused before training."""

import json
import shutil
import subprocess
import sys

from mlx_kto.config.core import make_config
from mlx_kto.errors import UserError
from mlx_kto.export import fuse, to_peft
from mlx_kto.model.load import model_reference
from mlx_kto.train.run import train

import pytest


def _data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"Tell me about the {t}.", "completion": c, "label": i % 2 == 0}
        for i, (t, c) in enumerate(
            [("sky", " It is blue."), ("sea", " Go away."), ("cat", " Sure!"), ("hat", " No.")] * 2
        )
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _cfg(model, data, out, **kw):
    base = dict(model=model, data=data, adapter_path=out, batch_size=2, iters=2, lora_rank=2,
                max_length=32, steps_per_eval=0, steps_per_save=0, quiet=True, seed=0)  # fmt: skip
    base.update(kw)
    return make_config(None, **base)


def test_relative_model_path_is_stored_absolute(tiny_llama, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "models" / "base")
    _data(work / "data")
    monkeypatch.chdir(work)
    train(_cfg("models/base", "data", "run"), log=lambda *_: None)
    conf = json.loads((work / "run" / "adapter_config.json").read_text())
    assert conf["model"] == str((work / "models" / "base").resolve())

    monkeypatch.chdir(tmp_path)  # another folder: the adapter still finds its base
    fused = fuse(work / "run", tmp_path / "fused")
    assert (fused / "model.safetensors").is_file()
    peft_dir = to_peft(work / "run", tmp_path / "peft")
    peft_cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    assert peft_cfg["base_model_name_or_path"] == conf["model"]


def test_hub_ids_are_kept_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert model_reference("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a folder of that name wins
    assert model_reference("owner/name") == str((tmp_path / "owner" / "name").resolve())
    assert model_reference("~") == str(__import__("pathlib").Path.home().resolve())


def test_lora_on_embeddings_is_refused_before_training(tiny_llama, tmp_path):
    data = _data(tmp_path / "data")
    cfg = _cfg(str(tiny_llama), str(data), str(tmp_path / "run"),
               lora_keys=["self_attn.q_proj", "model.embed_tokens"])  # fmt: skip
    with pytest.raises(
        UserError, match=r"^--lora-keys \(lora_keys\): 'model\.embed_tokens' is an embedding"
    ):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run" / "adapters.safetensors").exists()

    # Through the CLI: one line, exit 2.
    p = subprocess.run(
        [sys.executable, "-m", "mlx_kto.cli", "train", "--model", str(tiny_llama), "--data",
         str(data), "--adapter-path", str(tmp_path / "run2"), "--lora-keys",
         "model.embed_tokens", "--iters", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2, p.stderr
    err = [line for line in p.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "'model.embed_tokens' is an embedding" in err[0], p.stderr
    assert "Traceback" not in p.stderr


def test_init_adapter_with_embedding_lora_is_refused(tiny_llama, tmp_path):
    import mlx.core as mx

    ad = tmp_path / "emb_adapter"
    ad.mkdir()
    conf = {"fine_tune_type": "lora", "num_layers": 2, "model": str(tiny_llama),
            "lora_parameters": {"rank": 2, "scale": 1.0, "dropout": 0.0,
                                "keys": ["model.embed_tokens"]}}  # fmt: skip
    (ad / "adapter_config.json").write_text(json.dumps(conf))
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    mx.save_safetensors(
        str(ad / "adapters.safetensors"),
        {
            "model.embed_tokens.lora_a": mx.zeros((vocab, 2)),
            "model.embed_tokens.lora_b": mx.zeros((2, 64)),
        },
    )
    data = _data(tmp_path / "data")
    cfg = _cfg(str(tiny_llama), str(data), str(tmp_path / "run"), init_adapter=str(ad))
    with pytest.raises(UserError, match=r"init_adapter .*'model\.embed_tokens' is an embedding"):
        train(cfg, log=lambda *_: None)
