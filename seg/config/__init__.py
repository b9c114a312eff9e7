"""Typed configuration of every command: ``training`` (`seg train`: data, model, train
sections; YAML < flags < dotted overrides), ``inference`` (`seg predict`, `seg evaluate`), and
``fields`` (how types, defaults and docstrings become flags, choices, help and validation).

``python -m seg.config`` prints the training defaults as the commented ``configs/default.yaml``.
"""

from seg.config.inference import EvaluateConfig, InferenceConfig, PredictConfig
from seg.config.training import (PRECISION_ALIASES, Config, DataConfig, ModelConfig, Precision, TrainConfig,
                                 add_config_arguments, build_config, config_from_args, config_from_dict,
                                 config_to_dict, config_to_yaml, defaults_yaml, parse_override, valid_keys)

__all__ = ["Config", "DataConfig", "EvaluateConfig", "InferenceConfig", "ModelConfig", "PRECISION_ALIASES",
           "Precision", "PredictConfig", "TrainConfig", "add_config_arguments", "build_config", "config_from_args",
           "config_from_dict", "config_to_dict", "config_to_yaml", "defaults_yaml", "parse_override", "valid_keys"]
