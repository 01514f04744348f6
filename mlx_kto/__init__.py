"""mlx_kto: KTO (Kahneman-Tversky Optimization) LoRA training with MLX."""

from mlx_kto import _blas, _heap

_blas.preload()  # must precede the first `import mlx.core`
_heap.tune()  # reuse freed pages (Linux CPU: fresh pages fault in slowly)

__version__ = "0.1.0"
