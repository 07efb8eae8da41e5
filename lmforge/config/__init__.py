"""Training configuration: `load_config(path, overrides)` -> a frozen, validated `TrainConfig`."""

from lmforge.config.load import dump_config, load_config, validate
from lmforge.config.schema import TrainConfig

__all__ = ["TrainConfig", "dump_config", "load_config", "validate"]
