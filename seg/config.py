"""Typed configuration: the single source of truth for a training run.

Nested dataclasses hold every setting with its default and a docstring. A run's config is
resolved in this order, each layer overriding the one before:

    code defaults  <  --config configs/X.yaml  <  CLI flags  <  dotted overrides (train.lr=3e-4)

Unknown keys are errors that list the valid ones; values are checked in ``__post_init__``
and an error names the field and the allowed values. YAML is read with ``yaml.safe_load``
only. The resolved config is printed at start, written to the run folder as ``config.yaml``
and stored (as a plain dict) inside every checkpoint.

The seed project's flags (``--data_dir --epochs --batch_size --lr --loss --scheduler
--image_size --checkpoint_dir --save_every --bilinear``) map onto fields through
``SEED_FLAGS``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


def _choice(section: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{section}.{name}={value!r} is not valid; allowed values are {', '.join(map(repr, allowed))}"
        )


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{section}.{name}={value!r} is not valid; it must be {bound}")


@dataclass
class DataConfig:
    data_dir: str = "data/shards"
    """Folder written by `seg prepare` (train-*.tar, val-*.tar, dataset.json)."""

    image_size: int = 256
    """Side of the square network input in pixels; images are resized to it for training."""

    in_channels: int = 3
    """Channels fed to the network: 3 (grey images are repeated) or 1 (RGB converted to grey)."""

    normalization: str = "dataset"
    """'dataset' (channel mean/std from dataset.json, falling back to ImageNet when absent),
    'imagenet' (ImageNet mean/std), or 'none' (scale to [0, 1] only)."""

    sampling: str = "resize"
    """How an image becomes a network input: 'resize' (whole image resized to image_size, the
    seed's way; prediction resizes the same way) or 'patch' (random image_size crops at native
    resolution, padded when smaller; prediction slides image_size tiles at native resolution,
    for microscopy and other images much larger than the network input)."""

    augment: bool = True
    """Augment training images (flips, 90-degree rotations, affine, intensity); see ``augmentation``."""

    augmentation: str = "standard"
    """With augment on: 'standard' (scale 0.9-1.1, rotation 15 degrees, brightness/contrast 0.2)
    or 'strong' (scale 0.7-1.4, rotation 30 degrees, gamma 0.7-1.5, brightness/contrast 0.3,
    blur): robustness to structures smaller or larger and to contrast unlike the training set."""

    foreground_crop: float = 0.0
    """sampling='patch' only: probability that a training crop is placed to contain foreground
    (where the image has any); the rest are uniform random crops. For sparse small structures in
    large images, where uniform crops are mostly background."""

    num_workers: int = 2
    """DataLoader worker processes per rank; shards are split over ranks x workers."""

    shuffle_buffer: int = 256
    """Samples held in the streaming shuffle buffer of each worker."""

    val_split: float = 0.2
    """Fraction sent to validation by `seg prepare` (kept for the seed's --val_split flag)."""

    def __post_init__(self) -> None:
        _positive("data", "image_size", self.image_size)
        if self.image_size % 16:
            raise ValueError(
                f"data.image_size={self.image_size} is not valid; it must be a multiple of 16 "
                f"(the U-Net halves the size 4 times), e.g. {max(16, round(self.image_size / 16) * 16)}"
            )
        _choice("data", "in_channels", self.in_channels, (1, 3))
        _choice("data", "normalization", self.normalization, ("dataset", "imagenet", "none"))
        _choice("data", "sampling", self.sampling, ("resize", "patch"))
        _choice("data", "augmentation", self.augmentation, ("standard", "strong"))
        if not 0.0 <= self.foreground_crop <= 1.0:
            raise ValueError(f"data.foreground_crop={self.foreground_crop!r} is not valid; it must be in [0, 1]")
        _positive("data", "num_workers", self.num_workers, allow_zero=True)
        _positive("data", "shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"data.val_split={self.val_split!r} is not valid; it must be in [0, 1)")


@dataclass
class ModelConfig:
    base_channels: int = 64
    """Width of the first level; doubles at each of the 4 downsamplings (64 -> 31.0M parameters)."""

    bilinear: bool = False
    """Bilinear upsampling instead of transposed convolutions (17.3M parameters at width 64)."""

    norm: str = "batch"
    """Normalisation after each convolution: 'batch' (BatchNorm), 'group' (GroupNorm, 8 groups) or
    'instance' (InstanceNorm). Group/instance use the same statistics in training and evaluation."""

    def __post_init__(self) -> None:
        _positive("model", "base_channels", self.base_channels)
        _choice("model", "norm", self.norm, ("batch", "group", "instance"))


@dataclass
class TrainConfig:
    epochs: int = 50
    """Passes over the training set (an epoch = training set size / global batch steps)."""

    batch_size: int = 8
    """Images per step on each rank (global batch = batch_size x world size x grad_accum)."""

    lr: float = 1e-3
    """Peak learning rate (after warm-up)."""

    optimizer: str = "adam"
    """'adam' (weight decay as L2 in the gradient), 'adamw' (decoupled weight decay) or 'sgd'
    (momentum 0.9, Nesterov)."""

    weight_decay: float = 1e-5
    """Weight decay: L2 for 'adam' and 'sgd', decoupled for 'adamw'."""

    loss: str = "combined"
    """'bce', 'dice' or 'combined' (bce_weight * BCE + dice_weight * soft Dice)."""

    bce_weight: float = 0.5
    """Weight of BCE in the combined loss."""

    dice_weight: float = 0.5
    """Weight of soft Dice in the combined loss."""

    dice_reduction: str = "batch"
    """Soft Dice 'batch' (pooled over the batch) or 'image' (mean over the images with foreground:
    small structures count as much as large ones)."""

    scheduler: str = "plateau"
    """'plateau' (ReduceLROnPlateau on val Dice, halving the lr), 'cosine', 'poly' or 'none'.
    Plateau by default: a constant Adam lr stalls short of the best Dice on real data, and the
    seed's --scheduler flag (which turns plateau on) keeps meaning the same."""

    scheduler_patience: int = 5
    """Epochs without val Dice improvement before 'plateau' lowers the lr."""

    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up from 0 over this many epochs (stepped per optimizer step);
    with 'cosine' and 'poly' the decay then runs per step over the remaining steps. Not with
    'plateau'."""

    ema_decay: float = 0.0
    """Exponential moving average of the weights (0 turns it off): validation, best/final model
    files and early stopping use the averaged weights; the raw weights are validated too and both
    curves go to history.csv. Per-step decay, ramped up over the first steps as (1+n)/(10+n)."""

    ema_bn_batches: int = 8
    """With ema_decay and BatchNorm: training batches over which the average's BatchNorm
    statistics are recomputed before each validation (0: keep the averaged statistics)."""

    early_stopping: int = 15
    """Stop after this many epochs without val Dice improvement; 0 turns it off."""

    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""

    grad_clip: float = 1.0
    """Max gradient norm; 0 turns clipping off."""

    mixed_precision: str = "auto"
    """'auto' (bf16 where supported, CPU included, else fp16 on GPU), 'bf16', 'fp16' or 'no'."""

    channels_last: bool = True
    """NHWC memory format for the model and inputs (faster convolutions on CPU and GPU)."""

    seed: int = 42
    """Seed for weights, data order and augmentation."""

    deterministic: bool = False
    """Deterministic kernels; with it, an interrupted and resumed CPU run equals an uninterrupted one."""

    checkpoint_dir: str = "runs/unet"
    """The run folder: config.yaml, history.csv, checkpoints, last/, plots."""

    save_every: int = 10
    """Write checkpoint_epoch_N.pth every N epochs; 0 turns it off."""

    threshold: float = 0.5
    """Probability threshold for validation metrics and stored in the model checkpoint."""

    resume: bool = True
    """Continue from <checkpoint_dir>/last/ when it exists."""

    log_with: str = "none"
    """'none' or 'tensorboard' (through Accelerate's trackers, when installed)."""

    max_steps_per_epoch: int = 0
    """Cap on steps per epoch for smoke runs; 0 means the full epoch."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr", "grad_accum"):
            _positive("train", name, getattr(self, name))
        for name in ("weight_decay", "bce_weight", "dice_weight", "grad_clip", "save_every",
                     "early_stopping", "scheduler_patience", "max_steps_per_epoch", "ema_bn_batches"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        _choice("train", "loss", self.loss, ("bce", "dice", "combined"))
        _choice("train", "dice_reduction", self.dice_reduction, ("batch", "image"))
        _choice("train", "scheduler", self.scheduler, ("none", "plateau", "cosine", "poly"))
        _choice("train", "optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _positive("train", "warmup_epochs", self.warmup_epochs, allow_zero=True)
        if self.warmup_epochs > 0 and self.scheduler == "plateau":
            raise ValueError(f"train.warmup_epochs={self.warmup_epochs!r} needs train.scheduler none, cosine or poly "
                             "(plateau lowers the lr on validation Dice, per epoch); set train.warmup_epochs=0 "
                             "or pick another scheduler")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay={self.ema_decay!r} is not valid; it must be in [0, 1) (0 = off)")
        _choice("train", "mixed_precision", self.mixed_precision, ("auto", "bf16", "fp16", "no"))
        _choice("train", "log_with", self.log_with, ("none", "tensorboard"))
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"train.threshold={self.threshold!r} is not valid; it must be in (0, 1)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# Seed flag -> (section, field). --scheduler is a switch in the seed: it turns on plateau.
SEED_FLAGS = {
    "data_dir": ("data", "data_dir"),
    "image_size": ("data", "image_size"),
    "val_split": ("data", "val_split"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "loss": ("train", "loss"),
    "checkpoint_dir": ("train", "checkpoint_dir"),
    "save_every": ("train", "save_every"),
    "bilinear": ("model", "bilinear"),
    "scheduler": ("train", "scheduler"),
    "num_workers": ("data", "num_workers"),
    "seed": ("train", "seed"),
    "mixed_precision": ("train", "mixed_precision"),
}


def _coerce(section: str, name: str, value: Any, typ: type) -> Any:
    """Coerce a YAML/CLI value to the field's type, with an error naming the field."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{section}.{name}={value!r} is not valid; expected a value of type {typ.__name__}")


def _section_fields(section_cls: type) -> dict[str, type]:
    hints = get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _sections() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def valid_keys() -> list[str]:
    """Every dotted key the config accepts, e.g. 'train.lr'."""
    return [f"{s}.{n}" for s, cls in _sections().items() for n in _section_fields(cls)]


def _merge(raw: dict[str, dict[str, Any]], updates: dict[str, Any], origin: str) -> None:
    """Merge a nested {section: {field: value}} mapping into raw, rejecting unknown keys."""
    sections = _sections()
    if not isinstance(updates, dict):
        raise ValueError(f"{origin}: expected a mapping of sections ({', '.join(sections)}), got {type(updates).__name__}")
    for section, values in updates.items():
        if section not in sections:
            raise ValueError(f"{origin}: unknown config section {section!r}; valid keys are {', '.join(valid_keys())}")
        if not isinstance(values, dict):
            raise ValueError(f"{origin}: section {section!r} must be a mapping of field: value")
        fields = _section_fields(sections[section])
        for name, value in values.items():
            if name not in fields:
                raise ValueError(
                    f"{origin}: unknown config key {section}.{name!s}; valid keys are {', '.join(valid_keys())}"
                )
            raw[section][name] = _coerce(section, name, value, fields[name])


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.lr=3e-4' -> ('train', 'lr', 0.0003). The value is parsed as YAML (safe)."""
    key, sep, value = text.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"override {text!r} is not of the form section.field=value (e.g. train.lr=3e-4)")
    section, _, name = key.strip().partition(".")
    return section, name, yaml.safe_load(value) if value.strip() else ""


def build_config(
    yaml_path: str | Path | None = None,
    flags: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Resolve a Config from defaults < YAML file < flags (dotted keys) < dotted overrides."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in _sections()}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist (presets are in configs/)")
        with path.open() as fh:
            loaded = yaml.safe_load(fh) or {}
        _merge(raw, loaded, str(path))
    for key, value in (flags or {}).items():
        section, _, name = key.partition(".")
        _merge(raw, {section: {name: value}}, "command line")
    for text in overrides or []:
        section, name, value = parse_override(text)
        _merge(raw, {section: {name: value}}, f"override {text!r}")
    return Config(**{s: cls(**raw[s]) for s, cls in _sections().items()})


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from config_to_dict output (e.g. a checkpoint), rejecting unknown keys."""
    raw: dict[str, dict[str, Any]] = {s: {} for s in _sections()}
    _merge(raw, d, "stored config")
    return Config(**{s: cls(**raw[s]) for s, cls in _sections().items()})


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


class _SchedulerFlag(argparse.Action):
    """``--scheduler [NAME]``: a bare flag means 'plateau'. argparse hands the optional value a
    following dotted override (``--scheduler train.lr=1e-3``); that one is kept as an override."""

    CHOICES = ("none", "plateau", "cosine", "poly")

    def __call__(self, parser, namespace, value, option_string=None):
        if isinstance(value, str) and "=" in value:
            namespace.scheduler_overrides = [*getattr(namespace, "scheduler_overrides", []), value]
            value = "plateau"
        if value not in self.CHOICES:
            parser.error(f"argument --scheduler: invalid choice {value!r} (choose from {', '.join(self.CHOICES)})")
        setattr(namespace, self.dest, value)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, the seed's flags and positional dotted overrides."""
    parser.add_argument("--config", help="YAML preset (see configs/); flags and overrides win over it")
    parser.add_argument("--data_dir", help="folder written by `seg prepare` (data.data_dir)")
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--batch_size", type=int, help="images per step per rank (train.batch_size)")
    parser.add_argument("--lr", type=float, help="learning rate (train.lr)")
    parser.add_argument("--loss", choices=["bce", "dice", "combined"], help="train.loss")
    parser.add_argument("--scheduler", nargs="?", const="plateau", default=None, action=_SchedulerFlag,
                        metavar="{none,plateau,cosine,poly}",
                        help="lr schedule; the bare flag (as in the seed) means 'plateau'")
    parser.add_argument("--image_size", type=int, help="network input side in pixels (data.image_size)")
    parser.add_argument("--val_split", type=float, help="data.val_split (the split is made by `seg prepare`)")
    parser.add_argument("--checkpoint_dir", help="run folder (train.checkpoint_dir)")
    parser.add_argument("--save_every", type=int, help="train.save_every")
    parser.add_argument("--bilinear", action="store_true", default=None, help="model.bilinear")
    parser.add_argument("--num_workers", type=int, help="data.num_workers")
    parser.add_argument("--seed", type=int, help="train.seed")
    parser.add_argument("--mixed_precision", choices=["auto", "bf16", "fp16", "no"], help="train.mixed_precision")
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help=f"dotted overrides, applied last, e.g. train.lr=3e-4 model.base_channels=32")


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {}
    for flag, (section, name) in SEED_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            flags[f"{section}.{name}"] = value
    overrides = [*getattr(args, "scheduler_overrides", []), *(args.overrides or [])]
    return build_config(args.config, flags, overrides)
