from ouro_train.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    ParallelConfig,
    ScheduleConfig,
    SourceConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "ParallelConfig",
    "ScheduleConfig",
    "SourceConfig",
    "TrainConfig",
]
