"""`python -m mlx_kto.train`: the same options as `mlx-kto train`."""

from mlx_kto.train.run import main

main()
