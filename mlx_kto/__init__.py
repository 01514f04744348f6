"""mlx_kto: KTO (Kahneman-Tversky Optimization) LoRA training with MLX."""

from mlx_kto.runtime import blas as _blas
from mlx_kto.runtime import heap as _heap

_blas.preload()  # must precede the first `import mlx.core`
_heap.tune()  # reuse freed pages (Linux CPU: fresh pages fault in slowly)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use (measured startup cost): `import mlx_kto` must stay light, since
    # it runs before mlx.core is imported (the OpenBLAS preload above) and in processes that
    # never train; KTOTrainer / KTOConfig / Callback pull in MLX and the trainer (~0.4 s
    # against ~0.02 s for `import mlx_kto`, measured on a 2-core Linux machine).
    if name in ("KTOTrainer", "KTOConfig", "Callback"):
        from mlx_kto import api
        from mlx_kto.config import core as config
        from mlx_kto.train import callbacks as reporting

        return {"KTOTrainer": api.KTOTrainer, "KTOConfig": config.KTOConfig,
                "Callback": reporting.Callback}[name]  # fmt: skip
    raise AttributeError(f"module 'mlx_kto' has no attribute {name!r}")
