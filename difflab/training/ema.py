"""Exponential moving average of the weights (Polyak averaging; DDPM App. B uses decay 0.9999).

The averaged copy has the same module structure and parameter names as the trained model, so
``ema.safetensors`` loads into the same network class as ``model.safetensors``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``theta_ema <- d theta_ema + (1 - d) theta`` after every optimizer step.

    With ``warmup`` the decay of update ``n`` (counted from 0) is
    ``min(decay, (1 + n) / (10 + n))`` (the "num_updates" rule of TensorFlow's
    ``ExponentialMovingAverage``), so the average forgets the random initialisation quickly in
    short runs and reaches ``decay`` after about ``10 / (1 - decay)`` updates. Buffers (there
    are none in the U-Net) are copied, not averaged.

    Args:
        model: the trained model (unwrapped, not DDP).
        decay: the target decay in ``[0, 1)``.
        warmup: use the warm-up rule above.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (one fused lerp per dtype)."""
        d = self.current_decay()
        ema_p = list(self.model.parameters())
        new_p = [p.detach() for p in model.parameters()]
        if ema_p:
            torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    def state(self) -> dict[str, float | int | bool]:
        """The scalars that, with the averaged weights, restore the EMA exactly."""
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates}

    def load_state(self, state: dict) -> None:
        self.num_updates = int(state["num_updates"])
