"""`python -m mlx_kto.cli`: the same as `mlx-kto`."""

from mlx_kto.cli import main

main()
