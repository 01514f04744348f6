"""`python -m mlx_kto.train`: the same options as `mlx-kto train`."""

import sys

from mlx_kto.runtime import torchless

# Before the CLI's imports: transformers (through mlx-lm) must find torch marked absent.
torchless.keep_out()

from mlx_kto.cli.app import run  # noqa: E402
from mlx_kto.cli.train import train_command  # noqa: E402

run(train_command, sys.argv[1:], "python -m mlx_kto.train")
