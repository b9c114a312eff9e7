"""Cohort-scale prediction: engine (model, batching, tiles), inputs and units, decoding
workers, writers, manifest. ``seg/predict.py`` is the thin command-line entry.

``from seg.inference.engine import Predictor`` is the in-memory API (used by ``seg evaluate``).
"""
