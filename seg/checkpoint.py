"""Model checkpoints: plain tensors and plain dicts, loadable with ``weights_only=True``.

A model checkpoint (``best_model.pth``, ``final_model.pth``, ``checkpoint_epoch_N.pth``) is
everything prediction needs and nothing that needs unpickling code::

    {"format": "seg-model", "format_version": 1,
     "state_dict": {name: fp32 CPU tensor},
     "model": {"in_channels", "base_channels", "bilinear"},
     "preprocess": {"image_size", "in_channels", "mean": [..], "std": [..], "sampling"},
     "threshold": 0.5,
     "config": {resolved config as a plain dict},
     "epoch": int, "metrics": {name: float},
     "provenance": {git commit, package versions, world size, seeds, dataset checksum},
     "qc_reference": {training masks' distribution, see seg.data.qc_reference} or None}

``mean``/``std`` have ``in_channels`` values and apply to images scaled to [0, 1] by their
dtype's maximum (255 or 65535). Files are written atomically (temp name, then rename).
``qc_reference`` is copied from the training data's ``dataset.json``; checkpoints written before
it existed lack the key, and prediction QC then leaves out the plausibility signals.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import torch

from seg.fileio import atomic_write_bytes
from seg.model import UNet, build_model

FORMAT = "seg-model"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt, unsafe or not a seg model checkpoint."""


def model_checkpoint(model: torch.nn.Module, preprocess: dict, threshold: float = 0.5,
                     config: dict | None = None, epoch: int = 0, metrics: dict | None = None,
                     provenance: dict | None = None, qc_reference: dict | None = None) -> dict:
    """Build the plain-dict checkpoint for ``model`` (unwrapped from DDP/compile if needed)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in inner.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "model": dict(inner.config()),
        "preprocess": dict(preprocess),
        "threshold": float(threshold),
        "config": config or {},
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "provenance": provenance or {},
        "qc_reference": qc_reference,
    }


def checkpoint_bytes(obj: dict) -> bytes:
    """A checkpoint serialised once (``torch.save``), for every file it is written to."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_checkpoint(obj: dict, path: str | Path) -> None:
    """Write a checkpoint to a temporary name, then rename: never a truncated file under ``path``."""
    atomic_write_bytes(path, checkpoint_bytes(obj))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a model checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (a run folder holds best_model.pth and final_model.pth)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint {path} contains pickled Python objects and is refused: seg checkpoints hold only "
            f"tensors and plain dicts, loadable with torch.load(weights_only=True). ({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file): {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a seg model checkpoint (no format={FORMAT!r}); use a *_model.pth file from a run folder"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {ckpt['format_version']}; this seg reads up to {FORMAT_VERSION}")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> UNet:
    model = build_model(**ckpt["model"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """(model in eval mode, checkpoint dict) from a model checkpoint file."""
    ckpt = load_checkpoint(path, map_location)
    return model_from_checkpoint(ckpt), ckpt


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
