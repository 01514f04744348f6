"""Configuration: `KTOConfig` (one dataclass, a help string per field), YAML loading, and the
translation of mlx-lm's and TRL's names."""

from mlx_kto.config.fields import KTOConfig
from mlx_kto.config.loader import load_yaml, make_config

__all__ = ["KTOConfig", "load_yaml", "make_config"]
