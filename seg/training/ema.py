"""Exponential moving average (EMA) of a model's weights.

Design choices:

- The average is a second copy of the model (``ModelEMA.module``, eval mode, no gradients) on the
  same device and memory format, updated after every optimizer step:
  ``avg = d * avg + (1 - d) * weights`` for every floating-point tensor of the state dict, so
  BatchNorm running statistics are averaged too and stay consistent with the averaged weights;
  integer buffers (``num_batches_tracked``) are copied. One ``torch._foreach_lerp_`` over all
  tensors (no Python loop per tensor on the hot path).
- Decay ramp: ``d_n = min(decay, (1 + n) / (10 + n))`` after n updates, as in TensorFlow's and
  timm's EMA: the first averages are not dominated by the random initial weights.
- Why: the raw weights after an epoch of Adam at a useful learning rate are one noisy point of
  the trajectory; validation Dice measured on them jumps from epoch to epoch (a model good one
  epoch and useless the next). The average over the last ~1/(1-d) steps moves smoothly, so the
  validation curve, early stopping and the saved best model do not depend on the luck of the
  epoch's last batch.
- ``state_dict``/``load_state_dict`` hold the averaged tensors and the update count, so a run
  resumed from ``last/`` continues the same average.
"""

from __future__ import annotations

import copy

import torch


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
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

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

    def state_dict(self) -> dict:
        return {"module": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
                "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
