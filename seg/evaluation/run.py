"""The two evaluation modes put together: read, (predict,) score, gather, write.

Design choices:

- Every rank runs the same code on its share of the images (``sources``), scores them into a
  ``scoring.RankScores``, and the counts go to rank 0, which alone writes the report and plots
  to ``--output_dir``. Before the gather, the ranks share whether each succeeded, so an error on
  one rank stops every rank with that message instead of leaving the others waiting.
- Model mode batches images for ``seg.inference.engine.Predictor`` (the same preprocessing as
  ``seg predict``: from the checkpoint), scores the probability maps at the report threshold and
  sweeps 0.05 ... 0.95 on the same maps.
- Every output file is written atomically (``seg.fileio``); temporaries left by a crashed run
  are removed first.
- A ``--gt_dir`` of NIfTI volumes is scored by ``seg.evaluation.volumes`` (per-volume 3D
  metrics as new report keys, the slices through the same scorer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from seg.config.inference import EvaluateConfig
from seg.data.qc_reference import reference_from
from seg.dist import DistEnv
from seg.evaluation import panels, plots, qc_ranking, report as report_mod
from seg.evaluation.scoring import (Evaluation, RankScores, gather_payloads, merge, shared_errors)
from seg.evaluation.sources import LabelledImages, MaskPairs, Scorable
from seg.inference.qc import ImageQC
from seg.fileio import remove_stale_temporaries


class EvaluationError(RuntimeError):
    """Evaluation failed on at least one rank; the message holds every rank's error."""


def _bar(env: DistEnv, total: int | None, enabled: bool, desc: str):
    from seg.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit="img", dynamic_ncols=True,
                        disable=not (enabled and env.is_main))


def _score_masks(source: MaskPairs, scores: RankScores, env: DistEnv, cfg: EvaluateConfig) -> None:
    with _bar(env, source.count_for(env.rank, env.world_size), cfg.progress,
              "evaluate" + (f" (rank 0 of {env.world_size})" if env.is_distributed else "")) as bar:
        for item in source.assigned(env.rank, env.world_size, cfg.workers):
            scores.add(item.index, item.key, item.truth, pred=item.pred, image=item.image_loader)
            bar.update(1)


def batched(items: Iterable[Scorable], size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _score_model(source: LabelledImages, predictor, scores: RankScores, env: DistEnv, cfg: EvaluateConfig) -> None:
    with _bar(env, source.count_for(env.rank, env.world_size), cfg.progress,
              "predict+evaluate" + (f" (rank 0 of {env.world_size})" if env.is_distributed else "")) as bar:
        qc = ImageQC(predictor.threshold, reference_from(predictor.checkpoint))
        for batch in batched(source.assigned(env.rank, env.world_size, cfg.workers), predictor.batch_size):
            probs = predictor.predict_probabilities([item.image for item in batch])
            flips = predictor.pop_flip_dice()  # per image in resize mode; tile mode: per tile, not used
            flips = flips if flips is not None and len(flips) == len(batch) else [None] * len(batch)
            for item, prob, flip in zip(batch, probs, flips):
                scores.add(item.index, item.key, item.truth, prob=prob, image=item.image,
                           qc=qc(prob, item.image, None if flip is None else float(flip)))
            bar.update(len(batch))


def _finish(scores: RankScores, error: str | None, env: DistEnv, cfg: EvaluateConfig) -> Evaluation | None:
    """Share errors, gather counts; the merged evaluation on rank 0, None elsewhere."""
    errors = shared_errors(error, env)
    if errors:
        raise EvaluationError(errors[0] if not env.is_distributed else "evaluation failed:\n  " + "\n  ".join(errors))
    payloads = gather_payloads(scores.payload(), env)
    if not env.is_main:
        return None
    evaluation = merge(payloads, scores.threshold, cfg.worst_k, cfg.num_samples)
    if evaluation.report["n_images"] == 0:
        raise EvaluationError("no images were evaluated (the data source is empty)")
    return evaluation


def _run(score, scores: RankScores, env: DistEnv, cfg: EvaluateConfig) -> Evaluation | None:
    error = None
    try:
        score()
    except (ValueError, OSError) as exc:  # unreadable files, sizes, bad samples: user-facing
        if not env.is_distributed:
            raise
        error = str(exc)
    return _finish(scores, error, env, cfg)


def evaluate_masks(cfg: EvaluateConfig, env: DistEnv) -> tuple[Evaluation | None, str]:
    """Score existing masks (``--pred_dir``/``--gt_dir``); (evaluation on rank 0 else None, description)."""
    from seg.evaluation.pairing import pair_masks
    from seg.evaluation.volumes import holds_volumes

    if holds_volumes(cfg.gt_dir):
        return evaluate_volume_masks(cfg, env)
    pairs, ignored = pair_masks(cfg.pred_dir, cfg.gt_dir, cfg.image_dir)
    source = MaskPairs(pairs, cfg.gt_dir, cfg.pred_dir)
    if ignored and env.is_main:
        print(f"note: {ignored} file(s) in --pred_dir {cfg.pred_dir} have no truth in --gt_dir and are not scored")
    scores = RankScores(threshold=None, sweep=False, worst_k=cfg.worst_k, num_samples=cfg.num_samples)
    evaluation = _run(lambda: _score_masks(source, scores, env, cfg), scores, env, cfg)
    if evaluation is not None:  # QC recorded by seg predict in the folder's manifest, if any
        evaluation.qc = qc_ranking.manifest_qc(cfg.pred_dir)
    return evaluation, source.description


def evaluate_volume_masks(cfg: EvaluateConfig, env: DistEnv) -> tuple[Evaluation | None, str]:
    """Score NIfTI mask volumes: the slices as images, plus the per-volume report keys."""
    from seg.evaluation.volumes import VolumePairs, pair_volume_masks, volume_report_keys

    pairs, ignored = pair_volume_masks(cfg.pred_dir, cfg.gt_dir, cfg.image_dir)
    source = VolumePairs(pairs, cfg.gt_dir, cfg.pred_dir, cfg.tolerance_mm)
    if ignored and env.is_main:
        print(f"note: {ignored} volume(s) in --pred_dir {cfg.pred_dir} have no truth in --gt_dir and are not scored")
    scores = RankScores(threshold=None, sweep=False, worst_k=cfg.worst_k, num_samples=cfg.num_samples)
    error = None
    try:
        _score_masks(source, scores, env, cfg)
    except (ValueError, OSError) as exc:
        if not env.is_distributed:
            raise
        error = str(exc)
    errors = shared_errors(error, env)  # before the volume gather: every rank stops, or none
    if errors:
        raise EvaluationError("evaluation failed:\n  " + "\n  ".join(errors))
    per_volume = gather_payloads(source.results, env)
    evaluation = _finish(scores, None, env, cfg)
    if evaluation is not None:
        evaluation.report.update(volume_report_keys(per_volume, cfg.tolerance_mm))
    return evaluation, source.description


def evaluate_model(cfg: EvaluateConfig, env: DistEnv) -> tuple[Evaluation | None, str]:
    """Predict labelled data with ``cfg.model_path`` and score it (``--model_path``/``--data_dir``).

    The predictor runs with ``cfg``'s inference fields (device, precision, batch, TTA, tiles,
    threshold), as `seg predict` would.
    """
    source = LabelledImages(str(cfg.data_dir), cfg.split)
    from seg.inference.engine import Predictor

    from seg.evaluation import tuning

    target = tuning.tuned_path(cfg.model_path, cfg.output_dir, cfg.tuned_model_path) if cfg.tune_postprocessing else None
    predictor = Predictor(cfg.model_path, cfg)
    if env.is_main:
        print(f"model {cfg.model_path}: {predictor.describe()}")
    scores = RankScores(threshold=predictor.threshold, sweep=True, worst_k=cfg.worst_k, num_samples=cfg.num_samples,
                        postprocess=predictor.postprocess,
                        tune_thresholds=tuning.thresholds_for(predictor.threshold) if target else None)
    evaluation = _run(lambda: _score_model(source, predictor, scores, env, cfg), scores, env, cfg)
    if evaluation is not None and target is not None:
        evaluation.postprocessing = tuning.tune_and_save(evaluation.tuning, predictor.checkpoint, predictor.threshold,
                                                         target)
    return evaluation, f"model {cfg.model_path} on {source.description}"


def read_report(output_dir: Path) -> dict:
    """The ``evaluation_report.json`` written by ``write_outputs``."""
    import json

    return json.loads((Path(output_dir) / "evaluation_report.json").read_text())


def write_outputs(evaluation: Evaluation, source: str, output_dir: Path) -> dict[str, Path]:
    """Write the report files and plots; returns {name: path}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir, recursive=False)
    doc = report_mod.build_report(evaluation.report, evaluation.sweep)
    if evaluation.postprocessing is not None:
        doc["postprocessing"] = evaluation.postprocessing
    worst = [(t.key, t.dice) for t in evaluation.worst]
    dice = {p["id"]: p["dice"] for p in doc["per_image"]}
    qc = qc_ranking.qc_section(dice, evaluation.qc) if evaluation.qc else None
    if qc is not None:  # how well qc_score ranks quality (seg.evaluation.qc_ranking)
        doc["qc"] = qc
    text = report_mod.format_text(doc, evaluation.sweep, source, worst)
    out = {
        "report": report_mod.write_json(doc, output_dir),
        "text": report_mod.write_text(text + ("\n".join(qc_ranking.text_lines(qc)) + "\n" if qc else ""), output_dir),
        "confusion_matrix": plots.confusion_matrix(doc, output_dir / "confusion_matrix.png"),
        "metrics_distribution": plots.metrics_distribution(doc, output_dir / "metrics_distribution.png"),
        "metrics_summary": plots.metrics_summary(doc, output_dir / "metrics_summary.png"),
        "sample_predictions": panels.sample_predictions(evaluation.samples, doc, output_dir / "sample_predictions.png"),
        "worst_cases": panels.worst_cases(evaluation.worst, doc, output_dir / "worst_cases.png"),
    }
    if qc is not None:
        out["qc_vs_dice"] = qc_ranking.plot_qc_vs_dice(qc, dice, output_dir / "qc_vs_dice.png")
    if evaluation.sweep is not None:
        out["threshold_sweep"] = plots.threshold_sweep(evaluation.sweep, doc, output_dir / "threshold_sweep.png")
    if "per_volume" in doc:
        from seg.evaluation.volumes import volume_metrics_plot

        out["volume_metrics"] = volume_metrics_plot(doc, output_dir / "volume_metrics.png")
    return out
