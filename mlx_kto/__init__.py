"""mlx_kto: KTO (Kahneman-Tversky Optimization) LoRA training with MLX."""

from mlx_kto import _blas

_blas.preload()  # must precede the first `import mlx.core`

__version__ = "0.1.0"
