"""The one place that builds the `Accelerator` and chooses the numeric precision.

Design choices:

- Accelerate owns devices, DDP and mixed precision. It reads the torchrun environment itself
  (``torchrun``, ``accelerate launch`` and a plain single process all work); ``seg.dist`` is
  still called first so that a half-set environment is a clear error rather than a hang.
  DDP runs over gloo on CPU and NCCL on GPU, as Accelerate chooses. On a machine without
  CUDA the Accelerator is built with ``cpu=True`` (without it Accelerate ignores a multi-process
  CPU environment). Accelerate's own ``launch --cpu --num_processes N`` starts a single process
  unless mpirun is used; ``accelerate launch --multi_gpu --num_processes N`` (its torchrun-based
  launcher) gives N CPU processes over gloo on a machine without GPUs. A warning says so.
- Precision comes from ``seg.precision`` (the vocabulary and the 'auto' rule shared with
  prediction): bf16 where the device computes it natively (CPU included: bf16 autocast +
  channels_last is several times the fp32 step on a CPU with AMX: docs/BENCHMARKS.md), fp16 with a
  gradient scaler on GPUs without bf16, fp32 on request or where bf16 would be emulated.
- Collectives time out after ``train.collective_timeout`` seconds (Accelerate's
  ``InitProcessGroupKwargs``): a rank that died or hangs ends the job instead of leaving the
  others in an all-reduce until the allocation runs out.
- ``channels_last`` (NHWC) is applied to the model here and to every input batch by
  ``to_device``: convolutions on both CPU (oneDNN) and GPU (cuDNN) are faster in NHWC.
- Gradient accumulation and clipping go through Accelerate (``accumulate``,
  ``clip_grad_norm_``) so that DDP skips the gradient all-reduce on accumulation steps.
- DDP options (``gradient_as_bucket_view``, ``static_graph``) and cuDNN autotuning come from
  ``seg.training.devices``.
- ``deterministic: true`` seeds every RNG and turns on deterministic kernels
  (``torch.use_deterministic_algorithms``), the condition for bitwise-identical resumed runs.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from seg.config import Config
from seg.dist import read_dist_env
from seg.precision import accelerate_name, resolve_precision
from seg.training.devices import DeviceSettings, configure_cudnn, ddp_kwargs_handlers


def resolve_mixed_precision(requested: str, device_type: str | None = None) -> str:
    """The run's resolved precision ('bf16', 'fp16' or 'fp32') on this machine's device."""
    return resolve_precision(requested, device_type or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_tracker(log_with: str) -> list[str] | None:
    if log_with == "none":
        return None
    if log_with == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError(
                "train.log_with='tensorboard' needs the tensorboard package, which is not installed: "
                "run `pip install tensorboard`, or drop --log_with"
            )
        return ["tensorboard"]
    raise ValueError(f"train.log_with={log_with!r} is not valid; valid options are 'none', 'tensorboard'")


def build_accelerator(cfg: Config, project_dir: str | None = None):
    """Build the run's only `Accelerator` and seed every RNG.

    Args:
        cfg: the resolved config (train.mixed_precision, grad_accum, log_with, seed, deterministic).
        project_dir: folder for tracker logs (the run folder).
    Returns:
        an ``accelerate.Accelerator``.
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    read_dist_env()  # raises on a half-set torchrun environment
    t = cfg.train
    devices = DeviceSettings.from_config(cfg)  # cuDNN autotuning and DDP options (seg.training.devices)
    trackers = _check_tracker(t.log_with)
    if t.deterministic:
        # cuBLAS needs this before the first CUDA call for deterministic matmuls
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # CPU-only DDP (gloo) is only set up when asked
        mixed_precision=accelerate_name(resolve_mixed_precision(t.mixed_precision)),
        gradient_accumulation_steps=t.grad_accum,
        log_with=trackers,
        project_dir=project_dir,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout)),
                         *ddp_kwargs_handlers(devices, t.grad_accum)],  # gradient_as_bucket_view, static_graph
    )
    set_seed(t.seed, deterministic=t.deterministic)
    configure_cudnn(devices, accelerator.device, cfg.data.sampling, t.deterministic)
    if accelerator.num_processes == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" \
            and "MASTER_PORT" in os.environ:
        warnings.warn("`accelerate launch --cpu --num_processes N` starts ONE process (Accelerate needs mpirun "
                      "for several CPU processes): this run is single-process. For N CPU processes over gloo use "
                      "`accelerate launch --multi_gpu --num_processes N ...` (on a machine without GPUs it runs "
                      "on CPU) or `torchrun --nproc_per_node N -m seg.train ...`", stacklevel=2)
    return accelerator


def prepare_model(accelerator, model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """Move the model to the device in NHWC when asked; the caller passes it to ``prepare``."""
    model = model.to(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """One input batch to the device, NHWC when asked (non-blocking from pinned memory).

    Shape:
        ``(N, C, H, W)`` in, same logical shape out.
    """
    batch = batch.to(device, non_blocking=True)
    if channels_last and batch.dim() == 4:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def describe(accelerator) -> str:
    """One line: processes, device, backend and precision, for the start-up log."""
    state = accelerator.state
    backend = getattr(state, "backend", None) or "none"
    return (f"{accelerator.num_processes} process(es), device {accelerator.device}, "
            f"distributed {state.distributed_type.value} (backend {backend}), "
            f"mixed precision {accelerator.mixed_precision}")
