"""The report's entry points for ``seg predict --summarize``, ``seg evaluate`` and ``seg report``.

Each is one call from its command, so the commands only pass what they have.
"""

from __future__ import annotations

import json
from pathlib import Path

from seg.reporting.build import TABLE_CAP, WORST_N, build_report
from seg.reporting.cohort import load_cohort

REPORT = "report.html"
EVALUATION_PLOTS = ("qc_vs_dice.png", "metrics_distribution.png", "worst_cases.png", "sample_predictions.png",
                    "threshold_sweep.png")


def after_summarize(out_dir: Path, report: bool = True, worst_n: int = WORST_N) -> dict:
    """Merge the QC tables into ``OUT/qc.csv`` and write ``OUT/report.html``.

    Returns:
        ``{"qc_csv", "qc_rows", "report", "qc_notes"}`` (``qc_notes``: lines for the summary text).
    """
    from seg.inference.qc_table import merge_tables

    merged = merge_tables(out_dir)
    notes = []
    if merged["path"]:
        notes.append(f"qc.csv: {merged['rows']} images, lowest qc_score first ({merged['path']})"
                     + (f"; {merged['from_manifest']} rows taken from the manifest (their qc/ part rows are missing)"
                        if merged["from_manifest"] else ""))
    else:
        notes.append("qc.csv: not written (no image in the manifest has a QC record: predicted with --no_qc?)")
    result = {"qc_csv": merged["path"], "qc_rows": merged["rows"], "report": None, "qc_notes": notes}
    if report:
        rows, summary, info = load_cohort(out_dir)
        if rows:
            written = build_report(Path(out_dir) / REPORT, rows, pred_dir=Path(out_dir), summary=summary, info=info,
                                   worst_n=worst_n, subtitle=f"prediction folder {Path(out_dir).resolve()}")
            result["report"] = written["path"]
            notes.append(f"report: {written['path']} ({written['bytes'] / 1e6:.2f} MB, {written['seconds']:.1f} s)")
    return result


def evaluation_report(doc: dict, output_dir: Path, source: str, pred_dir: str | Path | None = None,
                      worst_n: int = WORST_N) -> Path:
    """Write ``OUTPUT_DIR/report.html`` for ``seg evaluate``: the prediction folder's cohort view
    (when ``--pred_dir`` is a ``seg predict`` folder) or the evaluated images, plus the evaluation."""
    output_dir = Path(output_dir)
    plots = [output_dir / name for name in EVALUATION_PLOTS]
    rows, summary, info, folder = _evaluated_rows(doc), None, None, None
    if pred_dir is not None and (Path(pred_dir) / "manifest.jsonl").is_file():
        rows, summary, info = load_cohort(Path(pred_dir))
        folder = Path(pred_dir)
    written = build_report(output_dir / REPORT, rows, pred_dir=folder, summary=summary, info=info, evaluation=doc,
                           plots=plots, worst_n=worst_n, title="seg evaluation report", subtitle=f"evaluated: {source}")
    return Path(written["path"])


def _evaluated_rows(doc: dict) -> list[dict]:
    """Report rows from an evaluation document alone (model mode: no masks on disk)."""
    qc = {p["id"]: p for p in (doc.get("qc") or {}).get("per_image", [])}
    rows = []
    for p in doc["per_image"]:
        fg = (p["tp"] + p["fp"]) / max(p["tp"] + p["fp"] + p["fn"] + p["tn"], 1)
        q = qc.get(p["id"])
        rows.append({"id": p["id"], "input": p["id"], "output": None, "tar": None, "foreground": fg,
                     "qc": {"score": q["qc_score"], "flags": q["qc_flags"]} if q else None})
    return rows


def report_command(pred_dir: Path, out: Path, gt_dir: Path | None = None, evaluation_json: Path | None = None,
                   worst_n: int = WORST_N, table_cap: int = TABLE_CAP, workers: int = 4) -> dict:
    """``seg report``: the page of a prediction folder, with an evaluation when ground truth is given
    (``gt_dir``: its masks are scored against the folder's, as ``seg evaluate --pred_dir`` does) or
    an existing ``evaluation_report.json``."""
    doc = None
    if evaluation_json is not None:
        doc = json.loads(Path(evaluation_json).read_text())
    elif gt_dir is not None:
        doc = _score(pred_dir, gt_dir, workers)
    rows, summary, info = load_cohort(pred_dir)
    if not rows:
        raise ValueError(f"{pred_dir}/manifest.jsonl holds no finished unit: run seg predict into {pred_dir} first")
    return build_report(out, rows, pred_dir=pred_dir, summary=summary, info=info, evaluation=doc, worst_n=worst_n,
                        table_cap=table_cap, subtitle=f"prediction folder {Path(pred_dir).resolve()}")


def _score(pred_dir: Path, gt_dir: Path, workers: int) -> dict:
    """Dice per image and the QC ranking of ``pred_dir`` against ``gt_dir`` (one process)."""
    from seg.dist import DistEnv
    from seg.evaluation import qc_ranking
    from seg.evaluation.report import build_report as build_doc
    from seg.config.inference import EvaluateConfig
    from seg.evaluation.run import evaluate_masks

    env = DistEnv(rank=0, world_size=1, local_rank=0)
    cfg = EvaluateConfig(pred_dir=str(pred_dir), gt_dir=str(gt_dir), worst_k=0, num_samples=0, workers=workers,
                         progress=False)
    evaluation, _ = evaluate_masks(cfg, env)
    doc = build_doc(evaluation.report, evaluation.sweep)
    qc = qc_ranking.qc_section({p["id"]: p["dice"] for p in doc["per_image"]}, evaluation.qc)
    if qc is not None:
        doc["qc"] = qc
    return doc
