"""`python -m mlx_kto.cli`: the same as `mlx-kto`."""

from mlx_kto.cli.app import main

main()
