"""``seg evaluate --tune_postprocessing``: the threshold and mask post-processing chosen on
validation images, written into a new checkpoint that ``seg predict`` applies by default.

Design choices:

- Every rank computes ``seg.postprocess.image_stats`` for its images (a few numbers per
  connected component per candidate threshold) while it scores them; rank 0 gathers those, not
  probability maps, and runs ``choose_postprocessing`` over every combination of threshold
  (0.10 ... 0.90 and the model's own), hole filling, minimum component size and largest-K.
- The objective is the per-image mean Dice: the pooled Dice barely moves when a small structure
  vanishes or a spurious blob appears on an otherwise empty image, which is exactly what
  post-processing changes. A candidate must beat the best so far by 0.001, and candidates are
  tried simplest first (the bare masks at the model's threshold, then at the other
  thresholds, then the component rules), so a small validation set does not buy complexity
  from noise.
- The tuned checkpoint is the evaluated one with ``threshold`` and ``postprocess`` replaced and
  ``postprocess_tuning`` (what was chosen, on how many images, the Dice before and after)
  added; the weights are not touched. It is written atomically, never over the evaluated file.
- The evaluation report itself stays the evaluated checkpoint's (as given); the choice and its
  validation Dice go into the report's ``postprocessing`` key.
"""

from __future__ import annotations

from pathlib import Path

from seg.checkpoint import save_checkpoint
from seg.postprocess import THRESHOLDS, choose_postprocessing

OBJECTIVE = "mean"


def thresholds_for(model_threshold: float) -> tuple[float, ...]:
    """The candidate thresholds: the grid and the model's own."""
    return tuple(sorted(set(map(float, THRESHOLDS)) | {float(model_threshold)}))


def tuned_path(model_path: str | Path, output_dir: str | Path, requested: str | None) -> Path:
    """Where the tuned checkpoint goes; refuses to overwrite the evaluated checkpoint."""
    path = Path(requested) if requested else Path(output_dir) / "tuned_model.pth"
    if path.resolve() == Path(model_path).resolve():
        raise ValueError(f"--tuned_model_path {path} is the evaluated checkpoint; give another file name")
    return path


def choose_entry(tuning: dict[str, dict], model_threshold: float) -> dict:
    """Choose on the gathered ``image_stats``: the entry ``tune_and_save`` describes, without a path."""
    keys = sorted(tuning)
    choice = choose_postprocessing([tuning[k] for k in keys], thresholds_for(model_threshold),
                                   objective=OBJECTIVE, default_threshold=model_threshold)
    return {"threshold": float(choice["threshold"]), "postprocess": choice["postprocess"].to_dict(),
            "dice": float(choice["dice"]), "baseline_dice": float(choice["baseline_dice"]),
            "objective": OBJECTIVE, "n_images": int(choice["n_images"])}


def save_tuned(checkpoint: dict, entry: dict, path: Path, chosen_by: str, **extra) -> None:
    """Write ``checkpoint`` with the choice ``entry`` (and any ``extra`` top-level keys) to ``path``."""
    tuned = {**checkpoint, "threshold": entry["threshold"], "postprocess": entry["postprocess"],
             "postprocess_tuning": {**entry, "chosen_by": chosen_by}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(tuned, path)


def tune_and_save(tuning: dict[str, dict], checkpoint: dict, model_threshold: float, path: Path,
                  chosen_by: str = "seg evaluate") -> dict:
    """Choose on the gathered ``image_stats`` and write the tuned checkpoint to ``path``.

    Returns:
        the report's ``postprocessing`` entry: ``threshold``, ``postprocess`` (dict), ``dice``
        (per-image mean with them), ``baseline_dice`` (the model as it was), ``objective``,
        ``n_images``, ``tuned_model_path``. The checkpoint's ``postprocess_tuning`` holds these but
        the path, and ``chosen_by`` (the command that chose).
    """
    entry = choose_entry(tuning, model_threshold)
    save_tuned(checkpoint, entry, path, chosen_by)
    return {**entry, "tuned_model_path": str(path)}
