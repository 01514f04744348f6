"""A base install without torch, simulated: commands run in a subprocess whose interpreter
cannot import torch (a sitecustomize on PYTHONPATH), with mlx_kto's own keep-out switched
off, so that nothing of ours is what hides it."""

import os
import subprocess
import sys

# Hides torch from this interpreter as if it were not installed: the path finder no longer
# finds `torch` (importlib.util.find_spec gives None, `import torch` raises
# ModuleNotFoundError), whatever mlx_kto does itself (the test also turns its own
# keep-out off with MLX_KTO_ALLOW_TORCH=1).
NO_TORCH = """
import sys
from importlib.machinery import PathFinder


class HideTorch(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [HideTorch if f is PathFinder else f for f in sys.meta_path]
"""


def no_torch_env(tmp_path) -> dict:
    """Environment of a process that cannot import torch (sitecustomize on PYTHONPATH),
    with a fresh cache (the GGUF tokenizer is built there, not read from ours)."""
    site = tmp_path / "no_torch"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    env = dict(os.environ, MLX_KTO_ALLOW_TORCH="1", MLX_KTO_CACHE_DIR=str(tmp_path / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return env


def mlx_kto(*args, env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mlx_kto.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
