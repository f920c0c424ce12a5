"""Typed configuration: the schema (:mod:`r2d.config.schema`) and its loading (:mod:`r2d.config.loading`).

    cfg = load_config("jobs/configs/tiny.yaml", ["train.max_steps=10"])
"""

from r2d.config.loading import (exit_on_config_error, field_docs, flatten, help_text, load_config, load_config_or_exit, parse_job_args,
                                parse_override)
from r2d.config.schema import (Config, ConfigError, DataConfig, DistillConfig, EngineConfig, EvalConfig, GateConfig,
                               LoraConfig, ModelConfig, ResourcesConfig, SamplingConfig, ServeConfig, SourceConfig,
                               TrackingConfig, TrainConfig)

__all__ = ["Config", "ConfigError", "DataConfig", "DistillConfig", "EngineConfig", "EvalConfig", "GateConfig",
           "LoraConfig", "ModelConfig", "ResourcesConfig", "SamplingConfig", "ServeConfig", "SourceConfig",
           "TrackingConfig", "TrainConfig", "exit_on_config_error", "field_docs", "flatten", "help_text", "load_config", "load_config_or_exit",
           "parse_job_args", "parse_override"]
