"""Prediction and evaluation options: typed dataclasses, the one place their defaults live.

``InferenceConfig`` is how a model checkpoint is run (device, precision, batch, TTA, tiles,
threshold); ``seg.inference.engine.Predictor`` takes it. ``PredictConfig`` adds what `seg predict`
reads and writes; ``EvaluateConfig`` what `seg evaluate` scores. Their command-line flags,
``seg doctor``'s prediction checks and the cohort runner all take names, defaults, allowed
values and help from these fields (``seg.config.fields.add_flags``); nothing restates them.
Every field is a flag, named ``--FIELD`` unless its metadata says otherwise (``--list``,
``--no_progress``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from seg.config.fields import check_literals, check_range
from seg.config.training import PRECISION_ALIASES, Precision


@dataclass
class InferenceConfig:
    model_path: str | None = None
    """Model checkpoint (*_model.pth from a run folder)."""

    threshold: float | None = None
    """Probability threshold; unset: the checkpoint's."""

    batch_size: int = 8
    """Images (or tiles) per forward."""

    device: str = "auto"
    """auto (this rank's GPU, else CPU), cpu, cuda, cuda:N."""

    precision: Precision = field(default="auto", metadata={"aliases": PRECISION_ALIASES})
    """Autocast precision: 'auto' (bf16 where the device computes it natively, else fp16 on a
    GPU, else fp32), 'bf16', 'fp16' (CUDA) or 'fp32'; outputs are float32 either way."""

    tta: bool = False
    """Average the predictions of horizontal and vertical flips (4x compute)."""

    tile_size: int | None = None
    """Predict at native resolution with tiles of this side; unset: tiles of the training size
    only for checkpoints trained with sampling=patch, else whole images resized."""

    tile_overlap: float = 0.25
    """Fraction of a tile shared with its neighbours."""

    postprocess: Literal["checkpoint", "none"] = "checkpoint"
    """Mask post-processing: 'checkpoint' applies the one stored in the checkpoint by `seg train`
    (best_model.pth) or `seg evaluate --tune_postprocessing` (hole filling, small-component
    removal, largest components; a checkpoint without one: nothing), 'none' leaves the
    thresholded masks as they are."""

    def __post_init__(self) -> None:
        check_literals(self, "inference")
        check_range("inference", "batch_size", self.batch_size, low=1)
        if self.threshold is not None:
            check_range("inference", "threshold", self.threshold, low=0, high=1, high_open=True)
        if self.tile_size is not None and self.tile_size < 16:
            raise ValueError(f"tile_size={self.tile_size} is not valid; it must be >= 16 (e.g. the training size)")
        check_range("inference", "tile_overlap", self.tile_overlap, low=0, high=1, high_open=True)


@dataclass
class PredictConfig(InferenceConfig):
    image_dir: str | None = None
    """Predict every image under this folder (recursive, by extension)."""

    list_path: str | None = field(default=None, metadata={"flag": "--list", "metavar": "FILE"})
    """Text file with one image path per line."""

    shards: str | None = None
    """Shards from `seg prepare` (glob or braces), labelled or not."""

    image_path: str | None = None
    """Predict one image (no manifest)."""

    mask_path: str | None = None
    """With --image_path: its ground truth; writes {stem}_visualization.png and prints metrics."""

    output_dir: str = "predictions"
    """Where masks, manifest.jsonl and failures.jsonl go."""

    save_overlay: bool = False
    """Also write {stem}_overlay.png."""

    save_probability: bool = field(default=False, metadata={"aliases_flags": ("--show_probability",)})
    """Also write {stem}_prob.png (16-bit, p x 65535); --show_probability is the same."""

    format: Literal["png", "tar"] = "png"
    """png files, or one tar per unit (for millions of images)."""

    num_workers: int = 2
    """Decoding threads (image files) or processes (shards) per rank (0: decode in the main thread)."""

    writer_threads: int = 4
    """Threads encoding and writing outputs."""

    unit_size: int = 256
    """Paths per unit of work (one manifest line each)."""

    part: int | None = None
    """This worker's part k of --num_parts (instead of a Slurm array)."""

    num_parts: int | None = None
    """Number of parts the cohort is split into."""

    overwrite: bool = False
    """Allow a different checkpoint in a used --output_dir: its records are set aside and
    every unit is redone."""

    progress: bool = True
    """Progress display (a bar on a terminal, periodic lines in a log)."""

    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    """torch.compile the model for the fixed batch shape (CUDA, resize mode): pays off on long
    cohorts only, compilation takes tens of seconds."""

    qc: bool = True
    """Per-image quality control: a qc record per image in manifest.jsonl and the qc/ tables
    merged into qc.csv by --summarize (docs/FORMATS.md)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_workers", "writer_threads"):
            check_range("predict", name, getattr(self, name), low=0)
        check_range("predict", "unit_size", self.unit_size, low=1)

    def inputs(self) -> list[str]:
        """The cohort input flags that were given (--image_dir, --list, --shards)."""
        return [name for name, v in (("--image_dir", self.image_dir), ("--list", self.list_path),
                                     ("--shards", self.shards)) if v]


@dataclass
class EvaluateConfig(InferenceConfig):
    pred_dir: str | None = None
    """Predicted masks (recursive; x.png or x_mask.png pairs with truth x.*)."""

    gt_dir: str | None = None
    """Ground-truth masks (recursive; any value > 0 is foreground)."""

    image_dir: str | None = None
    """Optional images, shown in sample_predictions.png and worst_cases.png."""

    tolerance_mm: float = 1.0
    """NIfTI volumes: the surface Dice tolerance in millimetres."""

    data_dir: str | None = None
    """With --model_path: a folder from `seg prepare`, a shard pattern, or a folder with images/ and masks/."""

    tune_postprocessing: bool = False
    """Model mode: choose the threshold and post-processing (hole filling, minimum component
    size, largest components) with the best per-image mean Dice on the evaluated images, and
    write them with the model into --tuned_model_path, which `seg predict` then applies."""

    tuned_model_path: str | None = None
    """Where --tune_postprocessing writes the tuned checkpoint; unset: <output_dir>/tuned_model.pth."""

    split: Literal["val", "train", "all"] = "val"
    """Split of a `seg prepare` folder to evaluate."""

    output_dir: str = "evaluation"
    """Folder for the report and plots."""

    worst_k: int = 8
    """Lowest-Dice images shown in worst_cases.png."""

    num_samples: int = 4
    """Images shown in sample_predictions.png."""

    workers: int = 4
    """Threads reading files."""

    progress: bool = True
    """Progress display (a bar on a terminal, periodic lines in a log)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("evaluate", "worst_k", self.worst_k, low=0)
        check_range("evaluate", "num_samples", self.num_samples, low=0)
        check_range("evaluate", "workers", self.workers, low=1)
        check_range("evaluate", "tolerance_mm", self.tolerance_mm, low=0)

    def mode(self) -> str:
        """'masks' (--pred_dir + --gt_dir) or 'model' (--model_path + --data_dir); ValueError otherwise."""
        masks, model = bool(self.pred_dir or self.gt_dir), bool(self.model_path or self.data_dir)
        if masks == model:
            raise ValueError("give either --pred_dir and --gt_dir (score existing masks) or --model_path and "
                             "--data_dir (predict, then score)" + (", not both" if masks else ""))
        if masks and not (self.pred_dir and self.gt_dir):
            raise ValueError("--pred_dir and --gt_dir go together")
        if model and not (self.model_path and self.data_dir):
            raise ValueError("--model_path and --data_dir go together")
        if masks and (self.tune_postprocessing or self.tuned_model_path):
            raise ValueError("--tune_postprocessing needs a model: give --model_path and --data_dir (the validation "
                             "split), not --pred_dir")
        if masks and self.threshold is not None:
            raise ValueError("--threshold applies to --model_path; masks in --pred_dir are binary "
                             "(any value > 0 is foreground)")
        return "masks" if masks else "model"
