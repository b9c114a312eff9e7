"""What the report shows, read from a prediction folder without reading its masks.

A prediction folder's ``manifest.jsonl`` holds every image with its foreground fraction and QC
record, and ``prediction.json`` (``write_prediction_info``) the settings of the run: that is
all the report needs for its summary, distributions and tables. Only the worst N images' files
are read later (``seg.reporting.thumbs``).
"""

from __future__ import annotations

import json
from pathlib import Path

from seg.fileio import atomic_write_json
from seg.inference.manifest import read_manifest, summarize

PREDICTION_INFO = "prediction.json"


def write_prediction_info(out_dir: Path, predictor, settings: dict) -> Path:
    """Write ``OUT/prediction.json``: the model and settings of this prediction run.

    Every worker writes the same content (atomically), so the last one to start leaves it.

    Args:
        predictor: the ``seg.inference.engine.Predictor``.
        settings: the run's options as plain values (format, tta, qc, ...).
    """
    ckpt = predictor.checkpoint
    ref = ckpt.get("qc_reference") or None
    info = {"model_path": str(predictor.path) if predictor.path else None, "model_sha256": predictor.sha256,
            "threshold": predictor.threshold, "mode": predictor.mode, "image_size": predictor.image_size,
            "tile_size": predictor.tile_size if predictor.mode == "tile" else None, "tta": predictor.tta,
            "preprocess": predictor.preprocess, "model": ckpt.get("model"), "epoch": ckpt.get("epoch"),
            "checkpoint_metrics": ckpt.get("metrics"),
            "qc_reference": None if not ref else {"split": ref.get("split"), "count": ref.get("count")},
            "settings": settings, "training_config": ckpt.get("config")}
    path = Path(out_dir) / PREDICTION_INFO
    atomic_write_json(path, info)
    return path


def load_cohort(pred_dir: Path) -> tuple[list[dict], dict, dict | None]:
    """``(rows, summary, prediction info)`` of a prediction folder.

    ``rows``: one dict per image (``input``, ``output``, ``tar``, ``unit``, ``foreground``,
    ``qc`` or None); ``summary``: ``seg.inference.manifest.summarize`` without file checks.
    """
    pred_dir = Path(pred_dir)
    rows, seen = [], set()
    for unit_id, record in read_manifest(pred_dir).items():
        for image in record.get("images", []):
            if image["input"] in seen:
                continue
            seen.add(image["input"])
            rows.append({"input": image["input"], "output": image["output"], "tar": record.get("tar"),
                         "unit": unit_id, "foreground": image.get("foreground"), "qc": image.get("qc")})
    summary = summarize(pred_dir, check_files=False)
    info_path = pred_dir / PREDICTION_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    return rows, summary, info
