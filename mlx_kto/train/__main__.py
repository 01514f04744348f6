"""`python -m mlx_kto.train`: the same options as `mlx-kto train`."""

import sys

from mlx_kto.cli.app import run, train_command
from mlx_kto.runtime import torchless

torchless.keep_out()  # this process is a command: torch stays out (runtime/torchless.py)
run(train_command, sys.argv[1:], "python -m mlx_kto.train")
