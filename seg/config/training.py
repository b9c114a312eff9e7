"""The training configuration: one typed dataclass per section, the single source of truth.

Nested dataclasses hold every setting with its type, default and a docstring. A run's config is
resolved in this order, each layer overriding the one before:

    code defaults  <  --config configs/X.yaml  <  CLI flags  <  dotted overrides (train.lr=3e-4)

Unknown keys are errors that list the valid ones; values are checked in ``__post_init__`` and
an error names the field and the allowed values (``Literal`` types, see ``seg.config.fields``).
YAML is read safely, with YAML 1.2 booleans. The resolved config is printed at start, written
to the run folder as ``config.yaml`` and stored (as a plain dict) inside every checkpoint.

Command-line flags are the fields marked ``flag`` in their metadata: the flags of the original
U-Net training scripts (``--data_dir --epochs --batch_size --lr --loss --scheduler
--image_size --checkpoint_dir --save_every --bilinear``) and a few more; every field is also a
dotted override. ``configs/default.yaml`` is ``defaults_yaml()`` written out (a test keeps them
equal: ``python -m seg.config > configs/default.yaml`` after changing a default).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from seg.config.fields import (ALIASES, add_flags, check_literals, check_range, choices, coerce, default_of,
                               field_docs, field_types, given, load_yaml)

Precision = Literal["auto", "bf16", "fp16", "fp32"]
"""Numeric precision of every command: 'auto' is bf16 where the device computes it natively,
else fp16 on a CUDA GPU, else fp32 (``seg.precision``)."""

PRECISION_ALIASES = {"no": "fp32"}  # Accelerate's word for fp32, accepted from older configs

def _flag(default, **meta):
    """A field that is also a command-line flag (``--NAME`` unless ``flag="--other"``)."""
    return field(default=default, metadata={"flag": True, **meta})


@dataclass
class DataConfig:
    data_dir: str = _flag("data/shards")
    """Folder written by `seg prepare` (train-*.tar, val-*.tar, dataset.json)."""

    image_size: int = _flag(256)
    """Side of the square network input in pixels; images are resized to it for training."""

    in_channels: Literal[1, 3] = 3
    """Channels fed to the network: with 3, grey images are repeated; with 1, RGB is converted to grey."""

    normalization: Literal["dataset", "imagenet", "none"] = "dataset"
    """Input normalisation after scaling to [0, 1]: 'dataset' uses the channel mean/std of
    dataset.json (ImageNet's when absent), 'imagenet' ImageNet's, 'none' nothing more."""

    sampling: Literal["resize", "patch"] = "resize"
    """How an image becomes a network input: 'resize' resizes the whole image to image_size (the
    original scripts' way; prediction resizes the same way); 'patch' takes random image_size
    crops at native resolution, padded when smaller, and prediction slides image_size tiles at
    native resolution (microscopy and other images much larger than the network input)."""

    augment: bool = True
    """Augment training images (flips, 90-degree rotations, affine, intensity); see ``augmentation``."""

    augmentation: Literal["standard", "strong"] = "strong"
    """With augment on: 'standard' (scale 0.9-1.1, rotation 15 degrees) or 'strong' (scale
    0.7-1.4, rotation 30 degrees: robustness to structures smaller or larger than in the training
    set); both with brightness/contrast 0.2 and faint noise."""

    foreground_crop: float = 0.0
    """sampling='patch' only: probability that a training crop is placed to contain foreground
    (where the image has any); the rest are uniform random crops. For sparse small structures in
    large images, where uniform crops are mostly background."""

    num_workers: int = _flag(2)
    """DataLoader worker processes per rank; shards are split over ranks x workers."""

    shuffle_buffer: int = 256
    """Samples held in the streaming shuffle buffer of each worker."""

    skip_bad_samples: bool = False
    """Skip a training or validation sample that cannot be decoded, and count it (history.csv
    skipped_samples), instead of stopping the run with an error naming it. A shard that is
    truncated or changed since `seg prepare` is always an error."""

    def __post_init__(self) -> None:
        check_literals(self, "data")
        check_range("data", "image_size", self.image_size, low=0, low_open=True)
        if self.image_size % 16:
            raise ValueError(
                f"data.image_size={self.image_size} is not valid; it must be a multiple of 16 "
                f"(the U-Net halves the size 4 times), e.g. {max(16, round(self.image_size / 16) * 16)}"
            )
        for name in ("num_workers", "shuffle_buffer"):
            check_range("data", name, getattr(self, name), low=0)
        check_range("data", "foreground_crop", self.foreground_crop, low=0, high=1)


@dataclass
class ModelConfig:
    base_channels: int = 64
    """Width of the first level; doubles at each of the 4 downsamplings (64 -> 31.0M parameters)."""

    bilinear: bool = _flag(False)
    """Bilinear upsampling instead of transposed convolutions (17.3M parameters at width 64)."""

    norm: Literal["batch", "group", "instance"] = "batch"
    """Normalisation after each convolution: 'batch' (BatchNorm), 'group' (GroupNorm, 8 groups) or
    'instance' (InstanceNorm). Group/instance use the same statistics in training and evaluation."""

    def __post_init__(self) -> None:
        check_literals(self, "model")
        check_range("model", "base_channels", self.base_channels, low=0, low_open=True)


@dataclass
class TrainConfig:
    epochs: int = _flag(50)
    """Passes over the training set (an epoch = training set size / global batch steps)."""

    batch_size: int = _flag(8)
    """Images per step on each rank (global batch = batch_size x world size x grad_accum)."""

    lr: float = _flag(3e-4)
    """Peak learning rate (after warm-up). 3e-4: with Adam and BatchNorm at 1e-3 the raw weights'
    validation Dice swung by up to 0.9 between epochs on real images (docs/BENCHMARKS.md)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    """'adam' (weight decay as L2 in the gradient), 'adamw' (decoupled weight decay) or 'sgd'
    (momentum 0.9, Nesterov)."""

    weight_decay: float = 1e-5
    """Weight decay: L2 for 'adam' and 'sgd', decoupled for 'adamw'."""

    loss: Literal["bce", "dice", "combined"] = _flag("combined")
    """Training loss; 'combined' is bce_weight * BCE + dice_weight * soft Dice."""

    bce_weight: float = 0.5
    """Weight of BCE in the combined loss."""

    dice_weight: float = 0.5
    """Weight of soft Dice in the combined loss."""

    dice_reduction: Literal["batch", "image"] = "image"
    """Soft Dice 'batch' (pooled over the batch) or 'image' (mean over the images with foreground:
    small structures count as much as large ones)."""

    scheduler: Literal["none", "plateau", "cosine", "poly"] = _flag("plateau", const="plateau")
    """Learning-rate schedule, stepped per epoch; 'plateau' halves the lr when val Dice stops
    improving (ReduceLROnPlateau). Plateau by default: a constant Adam lr stalls short of the
    best Dice on real data, and the original scripts' bare --scheduler flag means plateau."""

    scheduler_patience: int = 5
    """Epochs without val Dice improvement before 'plateau' lowers the lr."""

    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up from 0 over this many epochs (stepped per optimizer step);
    with 'cosine' and 'poly' the decay then runs per step over the remaining steps. Not with
    'plateau'."""

    ema_decay: float = 0.999
    """Exponential moving average of the weights (0 turns it off): validation, best/final model
    files and early stopping use the averaged weights; the raw weights are validated too and both
    curves go to history.csv. Per-step decay, ramped up as n/(n+4) after n steps (an averaging
    window of a quarter of the steps so far) until it reaches this value."""

    ema_bn_batches: int = 8
    """With ema_decay and BatchNorm: training batches over which the average's BatchNorm
    statistics are recomputed before each validation (0: keep the averaged statistics)."""

    select_on: Literal["both", "dice", "val_loss"] = "both"
    """What picks best_model.pth: 'dice' (the epoch with the highest validation Dice at
    train.threshold, the behaviour before), 'val_loss' (the lowest validation loss) or 'both':
    the two epochs are candidates (best_model.pth and best_loss_model.pth during training), and
    at the end the one with the higher per-image mean Dice on the validation images at their own
    size, after its threshold and post-processing are chosen, becomes best_model.pth (needs
    train.tune_postprocessing; without it best_model.pth stays the highest-Dice epoch). Why:
    the two training-time proxies each picked a worse epoch on one kind of real image, and the
    full-size choice picked the better one on every run (seg.training.loop has the numbers).
    Early stopping counts epochs without an improvement of what is selected on ('both': either)."""

    early_stopping: int = 15
    """Stop after this many epochs without an improvement of train.select_on; 0 turns it off."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    grad_clip: float = 1.0
    """Max gradient norm; 0 turns clipping off."""

    mixed_precision: Precision = _flag("auto", **{ALIASES: PRECISION_ALIASES})
    """Autocast precision: 'auto' (bf16 where the device computes it natively, else fp16 on a
    GPU, else fp32), 'bf16', 'fp16' (CUDA, with a gradient scaler) or 'fp32' ('no' is accepted
    for fp32)."""

    channels_last: bool = True
    """NHWC memory format for the model and inputs (faster convolutions on CPU and GPU)."""

    seed: int = _flag(42)
    """Seed for weights, data order and augmentation."""

    deterministic: bool = _flag(False)
    """Deterministic kernels; with it, an interrupted and resumed CPU run equals an uninterrupted one."""

    checkpoint_dir: str = _flag("runs/unet")
    """The run folder: config.yaml, history.csv, checkpoints, last/, plots."""

    save_every: int = _flag(10)
    """Write checkpoint_epoch_N.pth every N epochs; 0 turns it off."""

    threshold: float = 0.5
    """Probability threshold for validation metrics and stored in the model checkpoint."""

    tune_postprocessing: bool = _flag(True, flag="--no_tune_postprocessing")
    """At the end of training, choose best_model.pth's threshold and post-processing (hole
    filling, minimum component size, largest components) for the best per-image mean Dice on the
    validation images predicted at their own size, as seg evaluate --tune_postprocessing does;
    seg predict applies them by default (seg.training.tuning). Off: best_model.pth keeps
    train.threshold and no post-processing."""

    resume: bool = _flag(True, flag="--no_resume")
    """Continue from <checkpoint_dir>/last/ when it exists."""

    log_with: Literal["none", "tensorboard"] = _flag("none")
    """Experiment tracker, through Accelerate ('tensorboard' needs the tensorboard package)."""

    max_steps_per_epoch: int = 0
    """Cap on steps per epoch for smoke runs; 0 means the full epoch."""

    cudnn_benchmark: bool = True
    """CUDA: autotune each convolution for its input shape once, where training shapes are fixed
    (resize sampling, not deterministic)."""

    ddp_bucket_view: bool = True
    """DDP gradient_as_bucket_view: gradients are views into the all-reduce buckets (one
    model-sized copy less per step)."""

    ddp_static_graph: bool = True
    """DDP static_graph: every parameter is used in every step (left off with grad_accum > 1,
    where PyTorch's reducer refuses it)."""

    collective_timeout: int = 600
    """Seconds a rank waits in a collective (all-reduce, gather, barrier) before it fails: a rank
    that died must end the job, not leave the others waiting until the allocation runs out."""

    def __post_init__(self) -> None:
        check_literals(self, "train")
        for name in ("epochs", "batch_size", "lr", "grad_accum", "collective_timeout"):
            check_range("train", name, getattr(self, name), low=0, low_open=True)
        for name in ("weight_decay", "bce_weight", "dice_weight", "grad_clip", "save_every",
                     "early_stopping", "scheduler_patience", "max_steps_per_epoch", "warmup_epochs",
                     "ema_bn_batches"):
            check_range("train", name, getattr(self, name), low=0)
        check_range("train", "ema_decay", self.ema_decay, low=0, high=1, high_open=True)
        if self.warmup_epochs > 0 and self.scheduler == "plateau":
            raise ValueError(f"train.warmup_epochs={self.warmup_epochs!r} needs train.scheduler none, cosine or poly "
                             "(plateau lowers the lr on validation Dice, per epoch); set train.warmup_epochs=0 "
                             "or pick another scheduler")
        check_range("train", "threshold", self.threshold, low=0, high=1, low_open=True, high_open=True)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    """Every dotted key the config accepts, e.g. 'train.lr'."""
    return [f"{s}.{n}" for s, cls in SECTIONS.items() for n in field_types(cls)]


def _merge(raw: dict[str, dict[str, Any]], updates: Any, origin: str) -> None:
    """Merge a nested {section: {field: value}} mapping into raw, rejecting unknown keys."""
    if not isinstance(updates, dict):
        raise ValueError(f"{origin}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(updates).__name__}")
    for section, values in updates.items():
        if section not in SECTIONS:
            raise ValueError(f"{origin}: unknown config section {section!r}; valid keys are {', '.join(valid_keys())}")
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: section {section!r} must be a mapping of field: value")
        cls = SECTIONS[section]
        types_ = field_types(cls)
        metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name not in types_:
                raise ValueError(f"{origin}: unknown config key {section}.{name!s}; valid keys are {', '.join(valid_keys())}")
            raw[section][name] = coerce(value, types_[name], f"{section}.{name}", metadata[name].get(ALIASES))


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=3e-4' -> ('train', 'lr', 0.0003): the value is read as YAML (safe, YAML 1.2
    booleans), then coerced to the field's type by ``build_config``."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override {text!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
    section, _, name = key.strip().partition(".")
    return section, name, load_yaml(value) if value.strip() else ""


def _build(raw: dict[str, dict[str, Any]]) -> Config:
    return Config(**{s: cls(**raw[s]) for s, cls in SECTIONS.items()})


def build_config(yaml_path: str | Path | None = None, flags: dict[str, Any] | None = None,
                 overrides: list[str] | None = None) -> Config:
    """Resolve a Config from defaults < YAML file < flags (dotted keys) < dotted overrides."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (presets are in configs/)")
        with path.open() as fh:
            loaded = load_yaml(fh) or {}
        _merge(raw, loaded, str(path))
    for key, value in (flags or {}).items():
        section, _, name = key.partition(".")
        _merge(raw, {section: {name: value}}, "command line")
    for text in overrides or []:
        section, name, value = parse_override(text)
        _merge(raw, {section: {name: value}}, f"override {text!r}")
    return _build(raw)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from config_to_dict output (e.g. a checkpoint), rejecting unknown keys."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    _merge(raw, d, "stored config")
    return _build(raw)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def defaults_yaml() -> str:
    """The code defaults as a commented YAML preset (``configs/default.yaml``)."""
    lines = ["# The code defaults (seg/config/training.py) written out by `python -m seg.config`:",
             "# seg train --config configs/default.yaml is the same as no --config. Copy this file to",
             "# start a preset; every key is checked, unknown keys are errors. Precedence: code defaults",
             "# < this file < command-line flags < dotted overrides (train.lr=3e-4)."]
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}:"]
        docs, types_ = field_docs(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            allowed = choices(types_[f.name])
            doc = docs.get(f.name, "")
            if allowed:
                doc += f" One of: {', '.join(map(str, allowed))}."
            for text in _wrap(doc, 96):
                lines.append(f"  # {text}")
            value = yaml.safe_dump({f.name: default_of(f)}, default_flow_style=True).strip()[1:-1]
            lines.append(f"  {value}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) or [""]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the flag fields of every section, --print_config and positional dotted overrides."""
    parser.add_argument("--config", help="YAML preset (see configs/); flags and overrides win over it")
    for section, cls in SECTIONS.items():
        add_flags(parser, cls, only_marked=True, dest_prefix=f"{section}__")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides, applied last, e.g. train.lr=3e-4 model.base_channels=32")


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {f"{section}.{name}": value for section, cls in SECTIONS.items()
             for name, value in given(args, cls, dest_prefix=f"{section}__").items()}
    overrides = [*getattr(args, "overrides_before", []), *(args.overrides or [])]
    return build_config(args.config, flags, overrides)
