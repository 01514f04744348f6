"""Command processes keep torch out (mlx_kto/runtime/torchless.py): transformers then never
imports it, a GGUF's tokenizer is still read (built from the file's metadata, in-process), and
`allow` lifts the mark."""

import importlib.util
import json
import subprocess
import sys

import pytest
from toy_gguf import write_toy_gguf

HAS_TORCH = importlib.util.find_spec("torch") is not None


def run_py(code: str, tmp_path, **env) -> dict:
    """Run code in a fresh interpreter; it prints one JSON line, returned here."""
    import os

    e = {k: v for k, v in os.environ.items() if k != "MLX_KTO_ALLOW_TORCH"}
    e.update(MLX_KTO_CACHE_DIR=str(tmp_path / "cache"), **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


LOAD = """
import json, sys
from mlx_kto.runtime import torchless as _torchless
kept = _torchless.keep_out() if {keep} else False
from mlx_kto.model.load import load_base
from mlx_kto.config.core import KTOConfig
model, tok, _, _ = load_base(KTOConfig(model={model!r}))
ids = tok.encode("What color is the sky? It is blue.")
real = sys.modules.get("torch") is not None
print(json.dumps({{"kept": kept, "torch_imported": real, "ids": list(ids)}}))
"""


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed here: nothing to keep out")
def test_keep_out_loads_a_model_without_importing_torch(tiny_llama, tmp_path):
    out = run_py(LOAD.format(keep=True, model=str(tiny_llama)), tmp_path)
    assert out["kept"] and not out["torch_imported"]
    plain = run_py(LOAD.format(keep=False, model=str(tiny_llama)), tmp_path)
    assert plain["torch_imported"]  # transformers imports torch when nothing stops it
    assert out["ids"] == plain["ids"]


def test_gguf_tokenizer_is_built_in_process_when_torch_is_kept_out(tiny_llama, tmp_path):
    """No child process: the tokenizer comes from the GGUF's metadata either way, and the
    same ids come out with torch kept out and without (where torch is installed)."""
    path = write_toy_gguf(tiny_llama, tmp_path / "m.gguf")
    out = run_py(LOAD.format(keep=True, model=str(path)), tmp_path / "a")
    assert out["kept"] and not out["torch_imported"]
    plain = run_py(LOAD.format(keep=False, model=str(path)), tmp_path / "b")
    assert out["ids"] == plain["ids"] and len(out["ids"]) > 3


def test_allow_lifts_the_mark_and_the_switch_leaves_torch_alone(tmp_path):
    code = """
import json, importlib.util
from mlx_kto.runtime import torchless as _torchless
kept = _torchless.keep_out()
hidden = importlib.util.find_spec("torch") is None
_torchless.allow()
print(json.dumps({"kept": kept, "hidden": hidden, "after": _torchless.kept_out()}))
"""
    out = run_py(code, tmp_path)
    assert out == {"kept": True, "hidden": True, "after": False}
    off = run_py(code, tmp_path, MLX_KTO_ALLOW_TORCH="1")
    assert off["kept"] is False and off["hidden"] is (not HAS_TORCH)


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed here: nothing to keep out")
def test_the_train_command_keeps_torch_out(tmp_path):
    code = """
import json, runpy, sys
sys.argv = ["mlx_kto.train", "--help"]
try:
    runpy.run_module("mlx_kto.train", run_name="__main__")  # python -m mlx_kto.train --help
except SystemExit:
    pass
print(json.dumps({"torch": repr(sys.modules.get("torch", "absent"))}))
"""
    assert run_py(code, tmp_path)["torch"] == "None"


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed here: nothing to keep out")
def test_the_mlx_kto_entry_point_keeps_torch_out(tmp_path):
    # The console script does `from mlx_kto.cli import main; main()`: importing the package
    # must not reach transformers before main marks torch absent.
    code = """
import json, sys
sys.argv = ["mlx-kto", "train", "--help"]
from mlx_kto.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps({"torch": repr(sys.modules.get("torch", "absent"))}))
"""
    assert run_py(code, tmp_path)["torch"] == "None"
