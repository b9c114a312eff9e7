"""``python -m seg.config``: print the training defaults as the commented configs/default.yaml."""

from seg.config.training import defaults_yaml

print(defaults_yaml(), end="")
