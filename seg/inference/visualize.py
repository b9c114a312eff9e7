"""Single-image prediction (``--image_path``): outputs, and with ``--mask_path`` a visualization
and metrics, as the original Pytorch-UNet predict.py does.

Design choices: the single-image path uses the in-memory ``Predictor`` directly (no manifest,
no workers): it is for looking at one image. The visualization is one row of five panels
(image, truth, prediction, probability, overlay), written atomically; metrics come from
``seg.metrics`` with the package's empty-mask policy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seg.data.io import check_same_size, read_image, read_mask
from seg.fileio import atomic_path, atomic_write_bytes
from seg.inference.engine import Predictor
from seg.inference.inputs import safe_relative
from seg.inference.writers import encode_outputs, overlay_rgb, to_rgb8
from seg.metrics import METRIC_NAMES, confusion_counts, metrics_from_counts
from seg.postprocess import mask_of


def save_visualization(path: Path, image: np.ndarray, truth: np.ndarray | None, prob: np.ndarray,
                       threshold: float, postprocess=None) -> None:
    """Write the panels image | truth | prediction | probability | overlay as one PNG.

    Shape:
        image ``(H, W[, 3])``; truth bool ``(H, W)`` or None (panel omitted); prob ``(H, W)``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = mask_of(prob, threshold, postprocess)
    panels = [("image", to_rgb8(image), None)]
    if truth is not None:
        panels.append(("ground truth", truth, "gray"))
    panels += [(f"prediction (> {threshold:g})", mask, "gray"), ("probability", prob, "viridis"),
               ("overlay", overlay_rgb(image, mask), None)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    for ax, (title, data, cmap) in zip(axes, panels):
        kwargs = {"vmin": 0, "vmax": 1} if cmap else {}
        ax.imshow(data, cmap=cmap, **kwargs)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def image_metrics(prob: np.ndarray, truth: np.ndarray, threshold: float, postprocess=None) -> dict[str, float]:
    """Every seg.metrics metric of one image at ``threshold`` (then ``postprocess``)."""
    mask = mask_of(prob, threshold, postprocess)
    counts = confusion_counts(mask[None].astype(np.float32), truth[None].astype(np.float32), 0.5)
    values = metrics_from_counts(counts)
    return {m: float(values[m][0]) for m in METRIC_NAMES}


def predict_one(predictor: Predictor, image_path: str, out_dir: Path, mask_path: str | None = None,
                overlay: bool = False, probability: bool = False) -> dict:
    """Predict one image file and write its outputs into ``out_dir``.

    Returns:
        ``{"outputs": [paths], "foreground": float, "metrics": {...} | None}``.
    """
    image = read_image(image_path)
    prob = predictor.predict_probabilities([image])[0]
    post = predictor.postprocess
    files, fg = encode_outputs(prob, predictor.threshold, image, overlay, probability, post)
    stem = Path(safe_relative(Path(image_path).name)).stem
    outputs = []
    for suffix, data in files.items():
        atomic_write_bytes(out_dir / f"{stem}{suffix}", data)
        outputs.append(out_dir / f"{stem}{suffix}")
    metrics = None
    if mask_path:
        truth = read_mask(mask_path)
        check_same_size(image, truth, image_path, mask_path)
        metrics = image_metrics(prob, truth, predictor.threshold, post)
        vis = out_dir / f"{stem}_visualization.png"
        save_visualization(vis, image, truth, prob, predictor.threshold, post)
        outputs.append(vis)
    elif probability:
        vis = out_dir / f"{stem}_visualization.png"
        save_visualization(vis, image, None, prob, predictor.threshold, post)
        outputs.append(vis)
    return {"outputs": [str(p) for p in outputs], "foreground": fg, "metrics": metrics}
