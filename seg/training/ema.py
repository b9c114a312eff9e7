"""Exponential moving average (EMA) of a model's weights.

Design choices:

- The average is a second copy of the model (``ModelEMA.module``, eval mode, no gradients) on the
  same device and memory format, updated after every optimizer step:
  ``avg = d * avg + (1 - d) * weights`` for every floating-point tensor of the state dict, so
  BatchNorm running statistics are averaged too and stay consistent with the averaged weights;
  integer buffers (``num_batches_tracked``) are copied. One ``torch._foreach_lerp_`` over all
  tensors (no Python loop per tensor on the hot path).
- Decay ramp: ``d_n = min(decay, n / (n + WINDOW_DIVISOR))`` after n updates: the averaging
  window ``1 / (1 - d_n) = 1 + n / 4`` grows as a quarter of the steps taken so far, until
  ``decay`` caps it (0.999: 1000 steps, reached after 4000). The first averages are then not
  dominated by the random initial weights, and a short run is still averaged over its last
  epochs. TensorFlow's and timm's ramp ``(1 + n) / (10 + n)`` (a window of n / 9) was measured
  too short for runs of a few hundred steps: on the MNI grey-matter benchmark (12 steps per
  epoch) its average spanned about 10 steps at epoch 7 and followed the raw weights' swings
  (raw validation Dice 0.78 -> 0.65, the average 0.81 -> 0.76; largest drop after the first
  20 % of epochs 0.069); ``docs/BENCHMARKS.md`` has the runs.
- Why: the raw weights after an epoch of Adam at a useful learning rate are one noisy point of
  the trajectory; validation Dice measured on them jumps from epoch to epoch (a model good one
  epoch and useless the next). The average over the last ~1/(1-d) steps moves smoothly, so the
  validation curve, early stopping and the saved best model do not depend on the luck of the
  epoch's last batch.
- BatchNorm: averaged weights with averaged running statistics do not match (the statistics
  describe the activations of the raw weights along the way, not those of their average), and
  the average can validate far below the raw weights (measured: 0.70 against 0.80 Dice on one
  epoch). ``recalibrate_batchnorm`` recomputes the average's statistics from a few training
  batches (forward only, the exact mean over them, as ``torch.optim.swa_utils.update_bn`` does
  for averaged weights), then averages them over the ranks so every rank validates the same
  model. GroupNorm/InstanceNorm models have no running statistics and skip it.
- ``state_dict``/``load_state_dict`` hold the averaged tensors and the update count, so a run
  resumed from ``last/`` continues the same average.
"""

from __future__ import annotations

import copy

import torch


WINDOW_DIVISOR = 4.0  # the averaging window grows as (steps so far) / 4 until decay caps it


class ModelEMA:
    """An averaged copy of ``model`` (pass the model unwrapped from DDP/compile).

    Args:
        model: the trained module; copied once here.
        decay: the per-step decay (e.g. 0.99); the ramp above applies.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} is not valid; it must be in (0, 1)")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _tensors(self, model: torch.nn.Module):
        """(averaged float tensors, their live counterparts, averaged others, live others)."""
        live = model.state_dict()
        avg_f, live_f, avg_o, live_o = [], [], [], []
        for name, tensor in self.module.state_dict().items():
            source = live[name].detach()
            if tensor.is_floating_point():
                avg_f.append(tensor)
                live_f.append(source)
            else:
                avg_o.append(tensor)
                live_o.append(source)
        return avg_f, live_f, avg_o, live_o

    def current_decay(self) -> float:
        return min(self.decay, self.updates / (self.updates + WINDOW_DIVISOR))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimizer step)."""
        self.updates += 1
        d = self.current_decay()
        avg_f, live_f, avg_o, live_o = self._tensors(model)
        if avg_f:
            torch._foreach_lerp_(avg_f, [t.to(a.dtype) for t, a in zip(live_f, avg_f)], 1.0 - d)
        for a, t in zip(avg_o, live_o):
            a.copy_(t)

    def has_batchnorm(self) -> bool:
        return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.module.modules())

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches, forward, accelerator=None) -> int:
        """Recompute the average's BatchNorm running statistics from ``batches``.

        Args:
            batches: iterable of training image batches (already on the device).
            forward: ``forward(module, images)`` running the module (under the training autocast).
            accelerator: when it has several processes, the statistics are averaged over them.
        Returns:
            the number of batches used (0: no BatchNorm, nothing done).
        """
        norms = [m for m in self.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        self.module.train()
        used = 0
        try:
            for images in batches:
                forward(self.module, images)
                used += 1
        finally:
            self.module.eval()
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
        if accelerator is not None and accelerator.num_processes > 1:
            for m in norms:
                m.running_mean.copy_(accelerator.reduce(m.running_mean.clone(), reduction="mean"))
                m.running_var.copy_(accelerator.reduce(m.running_var.clone(), reduction="mean"))
        return used

    def state_dict(self) -> dict:
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
