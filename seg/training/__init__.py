"""The trainer behind `seg train`; ``seg/train.py`` is its thin entry point.

Modules, one concern each: ``accel`` (the one Accelerator, precision, NHWC), ``loaders``
(streaming training loader, exact validation loader), ``loop`` (epochs and steps),
``validate`` (exact distributed metrics), ``state`` (``last/``, preemption, exit code 75),
``history`` (history.csv), ``plots`` (PNG plots), ``provenance`` (reproducibility record).
"""
