"""The HTML report: a prediction folder (and its evaluation, where ground truth exists) in one page.

Sections: cohort summary (counts, unreadable inputs, flagged images, model checksum, settings
and training config), distributions (foreground fraction, ``qc_score``, flag counts), the
lowest-``qc_score`` images as overlay thumbnails with their flags and a link to the full-size
overlay, a capped table of the lowest-scoring images, and with an evaluation its metric table,
how well ``qc_score`` detects failures, ``qc_score`` against Dice and the evaluation's plots.

Design choices:

- Built from numbers (manifest, evaluation report), not from masks: only the ``worst_n``
  shown images are read (``seg.reporting.thumbs``), tables stop at ``table_cap`` rows (the
  complete list is ``qc.csv``), charts are inline SVG of bin counts. So the page's size and
  build time stay about flat in the cohort size (docs/BENCHMARKS.md has the 100,000-image run).
- One self-contained file: CSS inline, thumbnails and evaluation plots as data URIs; only the
  full-size overlays are separate files (the sibling ``<report stem>_files/`` folder, or the
  prediction folder's own overlays), linked relatively, so the folder can be copied as is.
- The page is written atomically, like every output.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from seg.evaluation.qc_ranking import manifest_id
from seg.fileio import atomic_write_text
from seg.inference.qc import FLAGS
from seg.reporting import svg
from seg.reporting.page import Raw, data_uri, esc, flags_html, fmt, page, section, table
from seg.reporting.thumbs import TarCache, make_case

WORST_N = 100
TABLE_CAP = 500


def _summary_section(rows: list[dict], summary: dict | None, info: dict | None, extra: list[tuple]) -> str:
    scored = [r["qc"]["score"] for r in rows if r.get("qc")]
    flagged = sum(1 for r in rows if r.get("qc") and r["qc"]["flags"])
    items = []
    if summary is not None:
        items += [("images predicted", summary["images"]),
                  ("units finished / planned", f"{summary['units']} / {summary['planned_units']}"),
                  ("unreadable inputs (failures.jsonl)", summary["failures"])]
    else:
        items.append(("images", len(rows)))
    fg = [r["foreground"] for r in rows if r.get("foreground") is not None]
    items += [("empty masks", sum(1 for v in fg if v == 0)),
              ("images with QC", len(scored)), ("flagged images (any rule)", flagged),
              ("median qc_score", float(np.median(scored)) if scored else None)]
    models = (summary or {}).get("models") or ([info["model_sha256"]] if info and info.get("model_sha256") else [])
    items.append(("model sha256", ", ".join(models) or None))
    if info:
        items += [("model file", info.get("model_path")), ("threshold", info.get("threshold")),
                  ("mode", info.get("mode")), ("TTA", info.get("tta")),
                  ("QC reference", "none (checkpoint without training distribution: plausibility signals absent)"
                   if not info.get("qc_reference") else
                   f"{info['qc_reference']['count']} {info['qc_reference']['split']} masks")]
    items += extra
    body = table(("", ""), items, element_id="summary-table")
    for problem in (summary or {}).get("problems", []):
        body += f'<p class="problem">PROBLEM: {esc(problem)}</p>'
    if info:
        body += (f"<details><summary>prediction settings and training config</summary>"
                 f"<pre>{esc(json.dumps(info, indent=1, default=str))}</pre></details>")
    return section("summary", "Cohort summary", body)


def _distributions(rows: list[dict]) -> str:
    qcs = [r["qc"] for r in rows if r.get("qc")]
    charts = [svg.histogram([r["foreground"] for r in rows], "hist-foreground", "Foreground fraction",
                            "predicted foreground fraction"),
              svg.histogram([q["score"] for q in qcs], "hist-qc", "qc_score", "qc_score (low = look first)",
                            colour="#d4802a")]
    counts = Counter(f for q in qcs for f in q["flags"])
    flag_rows = [(name, counts.get(name, 0), counts.get(name, 0) / max(len(qcs), 1)) for name in FLAGS]
    body = f'<div class="row">{"".join(charts)}<div>{table(("flag", "images", "share"), flag_rows, "flag-table")}</div></div>'
    return section("distributions", "Distributions", body)


def _card(row: dict, case: dict, dice: float | None) -> str:
    qc = row["qc"]
    img = (f'<a href="{esc(case["link"])}"><img src="{case["thumb"]}" alt="overlay of {esc(row["id"])}"></a>'
           if case.get("thumb") else '<div class="note">no thumbnail</div>')
    dice_txt = "" if dice is None else f" &middot; Dice {dice:.3f}"
    note = f'<div class="note">{esc(case["note"])}</div>' if case.get("note") else ""
    return (f'<div class="case" data-score="{qc["score"]}">{img}<div class="id">{esc(row["id"])}</div>'
            f'<div><span class="score">qc {qc["score"]:.3f}</span> &middot; fg {row["foreground"]:.3f}{dice_txt}</div>'
            f"<div>{flags_html(qc['flags'])}</div>{note}</div>")


def _worst(rows: list[dict], worst_n: int, pred_dir: Path | None, out: Path, dice: dict) -> tuple[str, list[dict]]:
    ranked = sorted((r for r in rows if r.get("qc")), key=lambda r: (r["qc"]["score"], r["id"]))
    shown = ranked[:worst_n]
    cards = []
    if pred_dir is not None and shown:
        files_dir = out.parent / f"{out.stem}_files"
        tars = TarCache()
        try:
            for k, row in enumerate(shown):
                cards.append(_card(row, make_case(pred_dir, row, k, files_dir, out.parent, tars), dice.get(row["id"])))
        finally:
            tars.close()
        body = f'<div class="cases" id="worst-cases">{"".join(cards)}</div>'
    else:
        body = '<p class="note">no prediction folder: listed in the table below without thumbnails</p>'
    if not ranked:
        body = '<p class="note">no image has a QC record (predicted with --no_qc or by an older seg)</p>'
    text = (f"The {len(shown)} lowest qc_score images of {len(ranked):,}; click a thumbnail for the full-size "
            "overlay (predicted mask in red).")
    return section("worst", "Lowest qc_score: look at these first", f'<p class="note">{esc(text)}</p>{body}'), ranked


def _table(ranked: list[dict], cap: int, dice: dict) -> str:
    rows = []
    for k, r in enumerate(ranked[:cap]):
        q = r["qc"]
        rows.append((k + 1, r["id"], q["score"], Raw(flags_html(q["flags"])), r["foreground"], q.get("entropy"),
                     q.get("flip_dice"), q.get("foreground_quantile"), q.get("components"), dice.get(r["id"])))
    note = (f"{min(cap, len(ranked))} of {len(ranked):,} images, lowest qc_score first"
            + ("; the complete table is qc.csv in the prediction folder" if len(ranked) > cap else ""))
    headers = ("#", "id", "qc_score", "flags", "foreground", "entropy", "flip Dice", "fg quantile", "components", "Dice")
    return section("lowest-table", "Lowest qc_score images", f'<p class="note">{esc(note)}</p>'
                   + table(headers, rows, "lowest-table-rows"))


def _evaluation(doc: dict, plots: list[Path]) -> str:
    metric_rows = [(m, doc["global"][m], doc["mean"][m], doc["std"][m]) for m in
                   ("dice", "iou", "precision", "recall", "specificity", "pixel_accuracy") if m in doc["global"]]
    body = table(("metric", "global", "mean", "std"), metric_rows, "metrics-table")
    qc = doc.get("qc")
    if qc:
        det_rows = []
        for name, d in qc["detection"].items():
            det_rows.append((name.replace("_", " "), d["failures"], d["auroc"], d["lowest_5pct"]["captured"],
                             d["lowest_5pct"]["precision"], d["lowest_10pct"]["captured"], d["lowest_10pct"]["precision"]))
        body += (f"<h3>How well qc_score finds failures ({qc['n_images']} images, Spearman with Dice "
                 f"{fmt(qc['spearman_dice'], 3)})</h3>"
                 + table(("failure", "images", "AUROC", "lowest 5 %: share of failures", "lowest 5 %: precision",
                          "lowest 10 %: share of failures", "lowest 10 %: precision"), det_rows, "qc-detection"))
        dice = {p["id"]: p["dice"] for p in doc["per_image"]}
        pts = [(p["qc_score"], dice[p["id"]]) for p in qc["per_image"] if p["id"] in dice]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        body += '<div class="row">' + svg.scatter(xs, ys, [y < 0.8 for y in ys], "scatter-qc-dice",
                                                  "qc_score vs Dice", "qc_score", "Dice")
        body += svg.histogram([p["dice"] for p in doc["per_image"]], "hist-dice", "Dice per image", "Dice",
                              colour="#4a9a5b") + "</div>"
    for path in plots:
        if Path(path).is_file():
            body += (f'<figure><img src="{data_uri(Path(path).read_bytes(), "image/png")}" alt="{esc(Path(path).name)}" '
                     f'style="max-width:100%"><figcaption class="note">{esc(Path(path).name)}</figcaption></figure>')
    return section("evaluation", "Evaluation against ground truth", body)


def build_report(out: Path, rows: list[dict], pred_dir: Path | None = None, summary: dict | None = None,
                 info: dict | None = None, evaluation: dict | None = None, plots: list[Path] = (),
                 worst_n: int = WORST_N, table_cap: int = TABLE_CAP, title: str = "seg prediction report",
                 subtitle: str = "") -> dict:
    """Write the report page.

    Args:
        out: the HTML file to write (its ``<stem>_files/`` folder gets the full-size overlays).
        rows: one dict per image: ``input``, ``output``, ``tar``, ``foreground``, ``qc`` (or None);
            ``id`` is added (the evaluation id of the output).
        pred_dir: the prediction folder the thumbnails are read from (None: no thumbnails).
        summary, info: ``seg.inference.manifest.summarize`` and ``prediction.json`` content.
        evaluation: an ``evaluation_report.json`` document (with ``qc`` where available).
        plots: PNG files embedded in the evaluation section.

    Returns:
        ``{"path", "bytes", "seconds", "thumbnails"}``.
    """
    start = time.perf_counter()
    out = Path(out)
    for r in rows:
        r.setdefault("id", manifest_id(r["output"]) if r.get("output") else r.get("input"))
    dice = {p["id"]: p["dice"] for p in evaluation["per_image"]} if evaluation else {}
    worst_html, ranked = _worst(rows, worst_n, pred_dir, out, dice)
    sections = [_summary_section(rows, summary, info, []), _distributions(rows), worst_html,
                _table(ranked, table_cap, dice)]
    if evaluation:
        sections.append(_evaluation(evaluation, list(plots)))
    html = page(title, subtitle or time.strftime("written %Y-%m-%d %H:%M:%S"), sections)
    atomic_write_text(out, html)
    return {"path": str(out), "bytes": len(html.encode()), "seconds": round(time.perf_counter() - start, 3),
            "thumbnails": min(worst_n, len(ranked)) if pred_dir is not None else 0}
