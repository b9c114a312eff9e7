"""Inline SVG charts for the report: histograms and a scatter plot, drawn from numbers alone.

Design choices: SVG written as text, so a chart costs a few kilobytes and microseconds whatever
the cohort size (a histogram is its bin counts), needs no plotting library at report time, and
stays sharp at any zoom. The scatter draws at most ``MAX_POINTS`` points (every highlighted one
first, then an even subsample of the rest, said in the caption), so a 100,000-image cohort
does not make a 5 MB chart.
"""

from __future__ import annotations

import numpy as np

from seg.reporting.page import esc

W, H = 440, 230
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 26, 38
MAX_POINTS = 4000


def _axes(title: str, xlabel: str, ylabel: str, xlo: float, xhi: float, ylo: float, yhi: float) -> list[str]:
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    parts = [f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{esc(title)}</text>',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fbfcfd" stroke="#9aa5b1"/>',
             f'<text x="{LEFT + pw / 2}" y="{H - 6}" text-anchor="middle" font-size="11">{esc(xlabel)}</text>',
             f'<text x="12" y="{TOP + ph / 2}" text-anchor="middle" font-size="11" '
             f'transform="rotate(-90 12 {TOP + ph / 2})">{esc(ylabel)}</text>']
    for k in range(5):
        fx = k / 4
        xv = xlo + fx * (xhi - xlo)
        parts.append(f'<text x="{LEFT + fx * pw:.1f}" y="{TOP + ph + 14}" text-anchor="middle" font-size="10">'
                     f'{xv:.3g}</text>')
        yv = ylo + fx * (yhi - ylo)
        parts.append(f'<text x="{LEFT - 4}" y="{TOP + ph - fx * ph + 3:.1f}" text-anchor="end" font-size="10">'
                     f'{yv:.3g}</text>')
    return parts


def histogram(values, element_id: str, title: str, xlabel: str, lo: float = 0.0, hi: float = 1.0,
              bins: int = 40, colour: str = "#3b78b0") -> str:
    """An SVG histogram of ``values`` over ``[lo, hi]``; the counts are in ``data-counts``."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    counts, _ = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    top = max(int(counts.max()) if len(counts) else 0, 1)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    bw = pw / bins
    parts = _axes(f"{title} (n = {len(v):,})", xlabel, "images", lo, hi, 0, top)
    for i, c in enumerate(counts):
        if c:
            h = ph * c / top
            parts.append(f'<rect x="{LEFT + i * bw + 0.5:.1f}" y="{TOP + ph - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{int(c)}</title></rect>')
    counts_attr = ",".join(str(int(c)) for c in counts)
    return (f'<svg id="{esc(element_id)}" data-counts="{counts_attr}" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
            + "".join(parts) + "</svg>")


def scatter(xs, ys, highlight, element_id: str, title: str, xlabel: str, ylabel: str) -> str:
    """An SVG scatter on [0, 1] x [0, 1]; ``highlight`` points in red, drawn last."""
    x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    hl = np.asarray(highlight, bool)
    order = np.concatenate([np.flatnonzero(~hl), np.flatnonzero(hl)])
    shown = order
    if len(order) > MAX_POINTS:
        keep_hl = np.flatnonzero(hl)[:MAX_POINTS]
        rest = np.flatnonzero(~hl)
        room = MAX_POINTS - len(keep_hl)
        rest = rest[np.linspace(0, len(rest) - 1, room).astype(int)] if room > 0 and len(rest) else rest[:0]
        shown = np.concatenate([rest, keep_hl])
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    note = "" if len(shown) == len(order) else f", {len(shown):,} of {len(order):,} shown"
    parts = _axes(title + note, xlabel, ylabel, 0, 1, 0, 1)
    for i in shown:
        colour = "#c0392b" if hl[i] else "#3b78b0"
        parts.append(f'<circle cx="{LEFT + np.clip(x[i], 0, 1) * pw:.1f}" cy="{TOP + ph - np.clip(y[i], 0, 1) * ph:.1f}" '
                     f'r="2.2" fill="{colour}" fill-opacity="0.65"/>')
    return (f'<svg id="{esc(element_id)}" data-points="{len(shown)}" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
            + "".join(parts) + "</svg>")
