"""Typed configuration: one dataclass per section (sections.py), loaded from YAML with `--set a.b=value` overrides
(load.py), validated strictly before anything starts (checks.py), and put to use (output.py)."""

from nullbooth.config.checks import (
                                       THRESHOLD_RANGES,
                                       check_model_path,
                                       has_word,
                                       parse_attention_entry,
                                       validate,
)
from nullbooth.config.load import apply_override, load_config
from nullbooth.config.output import config_to_yaml, reference_table, with_absolute_paths
from nullbooth.config.sections import (
                                       DEFAULT_PROTECTED_LAYERS,
                                       EMBEDDED_MODEL_NAMES,
                                       PROJECTION_MODES,
                                       SCHEDULERS,
                                       THRESHOLD_KINDS,
                                       AttentionMapsConfig,
                                       Config,
                                       CovarianceConfig,
                                       EvalConfig,
                                       GenerateConfig,
                                       ModelConfig,
                                       PreserveConfig,
                                       ProjectionConfig,
                                       RayConfig,
                                       SamplingConfig,
                                       ThresholdConfig,
                                       TrainConfig,
)

__all__ = ["DEFAULT_PROTECTED_LAYERS", "EMBEDDED_MODEL_NAMES", "PROJECTION_MODES", "SCHEDULERS", "THRESHOLD_KINDS",
           "THRESHOLD_RANGES", "AttentionMapsConfig", "Config", "CovarianceConfig", "EvalConfig", "GenerateConfig",
           "ModelConfig", "PreserveConfig", "ProjectionConfig", "RayConfig", "SamplingConfig", "ThresholdConfig",
           "TrainConfig", "apply_override", "check_model_path", "config_to_yaml", "has_word", "load_config",
           "parse_attention_entry", "reference_table", "validate", "with_absolute_paths"]
