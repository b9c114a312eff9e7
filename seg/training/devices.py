"""The trainer's device settings: cuDNN autotuning and DDP options (through Accelerate).

Design choices:

- ``torch.backends.cudnn.benchmark`` (autotune each convolution for its input shape once) is
  on for CUDA when training shapes are fixed: in resize sampling every batch is S x S, and the
  epoch's last, smaller batch and validation add a shape or two. It stays off for patch
  sampling (validation runs whole images padded to a multiple of 16, a new shape, hence a new
  autotune, for every image size) and for ``deterministic`` runs (autotuning may choose
  nondeterministic algorithms).
- DDP through ``accelerate.utils.DistributedDataParallelKwargs``:
  ``gradient_as_bucket_view`` (gradients are views into DDP's all-reduce buckets: one
  model-sized copy and buffer less per step) and ``static_graph`` (the U-Net uses every
  parameter in every step; DDP then skips the per-iteration search for unused parameters and
  can reorder buckets after the first iteration). Both are on by default and are plain DDP
  features, so they apply to gloo on CPU and NCCL on GPU alike (a two-process CPU test trains
  with them, with and without gradient accumulation). ``static_graph`` is left off with
  gradient accumulation: DDP's reducer fails an internal assertion when the first iteration
  runs under ``no_sync`` (measured with torch 2.13: ``expect_autograd_hooks_``).
- ``DeviceSettings.from_config`` reads ``train.cudnn_benchmark``, ``train.ddp_bucket_view`` and
  ``train.ddp_static_graph`` (their defaults live in ``seg.config.training``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceSettings:
    """Args:
        cudnn_benchmark: autotune convolutions where shapes are fixed (CUDA, resize sampling).
        ddp_bucket_view: DDP ``gradient_as_bucket_view``.
        ddp_static_graph: DDP ``static_graph``.
    """
    cudnn_benchmark: bool
    ddp_bucket_view: bool
    ddp_static_graph: bool

    @classmethod
    def from_config(cls, cfg) -> "DeviceSettings":
        t = cfg.train
        return cls(t.cudnn_benchmark, t.ddp_bucket_view, t.ddp_static_graph)


def ddp_kwargs_handlers(settings: DeviceSettings, grad_accum: int = 1) -> list:
    """The ``kwargs_handlers`` for ``Accelerator``: how DDP wraps the model (ignored without DDP).

    Args:
        grad_accum: micro-batches per optimizer step; above 1, ``static_graph`` stays off.
    """
    from accelerate.utils import DistributedDataParallelKwargs

    return [DistributedDataParallelKwargs(gradient_as_bucket_view=settings.ddp_bucket_view,
                                          static_graph=settings.ddp_static_graph and grad_accum == 1)]


def configure_cudnn(settings: DeviceSettings, device: torch.device, sampling: str, deterministic: bool) -> bool:
    """Turn cuDNN autotuning on where it pays (see the module docstring); returns whether it is on."""
    on = settings.cudnn_benchmark and device.type == "cuda" and sampling == "resize" and not deterministic
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = on
    return on
