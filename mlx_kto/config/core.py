"""The names the rest of the package imports as `mlx_kto.config.core` (kept stable while
the config moved into small modules): the dataclass (fields.py), its value checks
(checks.py), YAML loading and `make_config` (loader.py)."""

from mlx_kto.config.checks import (
    KL_ESTIMATES,
    LOSS_TYPES,
    QUANT_BITS,
    QUANT_GROUP_SIZES,
    SCHEDULES,
    check_rows_per_step,
)
from mlx_kto.config.fields import KTOConfig, field_choices, field_names
from mlx_kto.config.loader import load_yaml, make_config
from mlx_kto.config.types import flag

__all__ = [
    "KL_ESTIMATES", "LOSS_TYPES", "QUANT_BITS", "QUANT_GROUP_SIZES", "SCHEDULES", "KTOConfig",
    "check_rows_per_step", "field_choices", "field_names", "flag", "load_yaml", "make_config",
]  # fmt: skip
