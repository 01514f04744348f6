"""mlx-kto's command processes keep torch out (transformers would import it whenever it is
installed: ~240 MB resident and ~1.5 s at start for nothing); library use is untouched."""

import importlib.util
import json
import subprocess
import sys

from mlx_kto import _torchless

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _data(folder):
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"prompt": f"Tell me about the {t}.", "completion": c, "label": i % 2 == 0}
        for i, (t, c) in enumerate([("sky", " It is blue."), ("sea", " Go away.")] * 2)
    ]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _imported(stderr: str) -> set[str]:
    """Top-level module names from `python -X importtime` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed: nothing to keep out")
@pytest.mark.parametrize("entry", [["-m", "mlx_kto.train"], ["-m", "mlx_kto.cli", "train"]])
def test_train_commands_never_import_torch(tiny_llama, tmp_path, entry):
    data = _data(tmp_path / "data")
    cmd = [sys.executable, "-X", "importtime", *entry, "--model", str(tiny_llama),
           "--data", str(data), "--adapter-path", str(tmp_path / "run"), "--iters", "1",
           "--batch-size", "2", "--quiet"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    mods = _imported(p.stderr)
    assert {"mlx_lm", "transformers"} <= mods  # the tokenizer really went through transformers
    assert "torch" not in mods
    assert (tmp_path / "run" / "adapters.safetensors").is_file()


def test_block_and_allow(monkeypatch):
    monkeypatch.delenv("MLX_KTO_ALLOW_TORCH", raising=False)
    if sys.modules.get("torch") is not None:
        assert not _torchless.block()  # already imported: left alone
        return
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert _torchless.block()
    try:
        assert importlib.util.find_spec("torch") is None  # what transformers asks
        with pytest.raises(ImportError):
            import torch  # noqa: F401
    finally:
        _torchless.allow()
    assert "torch" not in sys.modules
    monkeypatch.setenv("MLX_KTO_ALLOW_TORCH", "1")
    assert not _torchless.block() and "torch" not in sys.modules
