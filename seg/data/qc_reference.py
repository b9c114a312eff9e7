"""The training masks' reference distribution that prediction QC compares masks against.

``seg prepare`` measures every labelled mask (``mask_stats``: foreground fraction, connected
components, whether it touches the image border) and writes the distribution of the split the
model trains on into ``dataset.json`` under ``qc_reference`` (``build_reference``); training
copies it into every model checkpoint (``ckpt["qc_reference"]``), where ``seg predict`` finds
it. Format (documented in docs/FORMATS.md)::

    {"version": 1, "split": "train", "count": N, "levels": 101, "connectivity": 8,
     "foreground_fraction": [101 quantiles at 0, 0.01, ..., 1],
     "components": [101 quantiles], "border_touch_rate": float}

Design choices:

- 101 quantiles (linear interpolation, numpy's default) describe any distribution in 2 KB of
  JSON whatever the data set size, and give each predicted mask its quantile directly
  (``seg.inference.qc.quantile_of``).
- Components are counted with 8-connectivity and no minimum size, exactly as prediction QC
  counts them (``count_components``), so both sides count alike. They are counted as the outer
  boundaries of ``cv2.findContours`` (``RETR_CCOMP``: a component inside another's hole is
  outer too), not with ``cv2.connectedComponents``: that one runs on OpenCV's thread pool, and a
  process that used the pool and then forks (``seg prepare``'s worker processes) leaves
  children that hang in their first OpenCV call.
- A data set or checkpoint written before this key existed has none: ``reference_from``
  returns ``None`` and QC leaves the plausibility signals out (its docstring says how).
"""

from __future__ import annotations

import cv2
import numpy as np

VERSION = 1
LEVELS = 101
CONNECTIVITY = 8


def count_components(mask: np.ndarray) -> int:
    """Connected components (8-connectivity) of a bool mask ``(H, W)``, single-threaded."""
    u8 = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    _, hierarchy = cv2.findContours(u8, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)  # OpenCV >= 3.2: input kept
    return 0 if hierarchy is None else int(np.count_nonzero(hierarchy[0, :, 3] == -1))


def mask_stats(mask: np.ndarray) -> tuple[float, int, bool]:
    """``(foreground fraction, connected components, touches border)`` of a bool mask ``(H, W)``."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    area = int(np.count_nonzero(mask))
    if not area:
        return 0.0, 0, False
    components = count_components(mask)
    border = bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
    return area / mask.size, components, border


def build_reference(stats: list[tuple[float, int, bool]], split: str) -> dict | None:
    """The reference dict of a split's ``mask_stats`` tuples; None when there are none."""
    if not stats:
        return None
    fg = np.array([s[0] for s in stats], np.float64)
    cc = np.array([s[1] for s in stats], np.float64)
    levels = np.linspace(0.0, 1.0, LEVELS)
    return {"version": VERSION, "split": split, "count": len(stats), "levels": LEVELS,
            "connectivity": CONNECTIVITY,
            "foreground_fraction": [round(float(v), 6) for v in np.quantile(fg, levels)],
            "components": [round(float(v), 3) for v in np.quantile(cc, levels)],
            "border_touch_rate": round(float(np.mean([s[2] for s in stats])), 6)}


def reference_from(info: dict | None) -> dict | None:
    """The reference of a ``dataset.json`` dict or a checkpoint dict, if it holds a usable one."""
    ref = (info or {}).get("qc_reference")
    if not isinstance(ref, dict) or not ref.get("count"):
        return None
    if len(ref.get("foreground_fraction", ())) < 2 or len(ref.get("components", ())) < 2:
        return None
    return ref
