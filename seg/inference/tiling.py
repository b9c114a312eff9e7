"""Sliding-window prediction of images larger than the network input, with Gaussian blending.

Design choices:

- Tiles of ``tile x tile`` pixels are spread evenly from the image's start to its end, as few
  as keep the step at most ``stride = tile * (1 - overlap)`` (as nnU-Net does), so every size
  works (sizes need not be divisible by the tile or the stride) and no tile sits a pixel or two
  from its neighbour, where both would leave the pixels between their edges poorly covered. An image smaller than the tile along a side is padded
  to the tile (reflection, so the border looks like image rather than a black frame) and the
  result cropped back.
- Each tile's probabilities are weighted by a Gaussian centred on the tile (sigma = tile / 8,
  as in nnU-Net), so predictions near tile edges, where the network sees least context, count
  least. Weights are clamped away from zero so that image borders (covered by one tile's edge
  only) are still defined.
- The tile grid is a full product of row starts x column starts and the 2-D Gaussian is the
  outer product of two 1-D ones, so the sum of weights at a pixel is ``Wy(y) * Wx(x)``: only
  the weighted-probability sum is accumulated (one float32 HxW array), then divided row by row.
  Peak memory is the raw image + one float32 HxW + ``batch`` tiles, never a float copy of the
  whole image: tiles are cut from the raw ``uint8``/``uint16`` array and normalised one batch at
  a time by ``forward`` (8192x8192 RGB: 192 MiB image + 256 MiB accumulator).
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Evenly spread start offsets of tiles covering ``[0, length)``; the last ends at ``length``.

    Args:
        length: image side in pixels (>= tile; pad smaller images first).
        tile: tile side in pixels.
        stride: distance between consecutive starts (1 <= stride <= tile).
    """
    if length <= tile:
        return [0]
    count = -(-(length - tile) // stride) + 1  # ceil: enough tiles for steps of at most `stride`
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def gaussian_1d(tile: int, sigma_scale: float = 1 / 8, floor: float = 1e-3) -> np.ndarray:
    """1-D Gaussian weights of a tile: peak 1 at the centre, ``floor`` minimum. Shape: ``(tile,)``."""
    centre = (tile - 1) / 2
    sigma = max(tile * sigma_scale, 1e-6)
    x = np.arange(tile, dtype=np.float64)
    w = np.exp(-((x - centre) ** 2) / (2 * sigma**2))
    return np.maximum(w / w.max(), floor).astype(np.float32)


def predict_tiled(image: np.ndarray, forward: Callable[[np.ndarray], np.ndarray], tile: int,
                  overlap: float = 0.25, batch_size: int = 4) -> np.ndarray:
    """Probabilities of a whole image from overlapping, Gaussian-weighted tiles.

    Args:
        image: the raw image, ``(H, W)`` or ``(H, W, C)``, any dtype (already in the model's
            channel layout).
        forward: maps a batch of raw tiles ``(N, tile, tile[, C])`` to probabilities
            ``(N, tile, tile)`` float32 (normalisation is its business).
        tile: tile side in pixels.
        overlap: fraction of a tile shared with its neighbour, in ``[0, 1)``.
        batch_size: tiles per forward.

    Shape:
        returns ``(H, W)`` float32 in [0, 1].
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"tile_overlap={overlap} is not valid; it must be in [0, 1), e.g. 0.25")
    if tile < 16:
        raise ValueError(f"tile_size={tile} is not valid; it must be at least 16 pixels")
    h, w = image.shape[:2]
    pad_h, pad_w = max(tile - h, 0), max(tile - w, 0)
    if pad_h or pad_w:
        pad = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (image.ndim - 2)
        mode = "reflect" if h > 1 and w > 1 and pad_h < h and pad_w < w else "edge"
        image = np.pad(image, pad, mode=mode)
    ph, pw = image.shape[:2]
    stride = max(1, int(round(tile * (1 - overlap))))
    ys, xs = tile_starts(ph, tile, stride), tile_starts(pw, tile, stride)
    g = gaussian_1d(tile)
    acc = np.zeros((ph, pw), np.float32)
    weight_y, weight_x = np.zeros(ph, np.float32), np.zeros(pw, np.float32)
    for y in ys:
        weight_y[y:y + tile] += g
    for x in xs:
        weight_x[x:x + tile] += g
    g2 = np.outer(g, g)
    coords = [(y, x) for y in ys for x in xs]
    for i in range(0, len(coords), batch_size):
        chunk = coords[i:i + batch_size]
        raw = np.stack([image[y:y + tile, x:x + tile] for y, x in chunk])
        prob = forward(raw)
        for (y, x), p in zip(chunk, prob):
            acc[y:y + tile, x:x + tile] += p * g2
    acc /= weight_y[:, None]
    acc /= weight_x[None, :]
    if pad_h or pad_w:
        acc = np.ascontiguousarray(acc[:h, :w])
    return np.clip(acc, 0.0, 1.0, out=acc)
