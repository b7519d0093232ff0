"""A network that reads noisy images ``x_t`` at a path time ``t`` without predicting noise.

Noise-aware classifiers (Dhariwal & Nichol 2021, Sec. 4) and noise-aware image-text models
(Liu et al. 2023, "More Control for Free", Sec. 4) see ``x_t`` from the same forward path as the
diffusion model and the time in the network's own convention. :class:`NoisyModel` is to them
what :class:`~difflab.Denoiser` is to a U-Net: it holds the path and converts ``t`` with
``path.time_input`` before calling the network, so objectives and guidance work in path time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.cond import Cond
from difflab.paths.base import GaussianPath


class NoisyModel:
    """``model(x_t, t, cond) = net(x_t, path.time_input(t), cond)``.

    Args:
        net: the network, ``net(x, t_input, cond) -> Tensor``.
        path: the forward path ``x_t`` comes from.
        time_input: map from path time to the network's time input (default
            ``path.time_input``: the step index on discrete paths, ``t`` otherwise).
    """

    def __init__(self, net: Callable[..., torch.Tensor], path: GaussianPath,
                 time_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.net = net
        self.path = path
        self.time_input = time_input or path.time_input

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None
                 ) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        # the time signal stays float32 (a bf16 input would round t)
        return self.net(x_t, self.time_input(t).float(), cond)

    def __repr__(self) -> str:
        return f"NoisyModel({type(self.net).__name__}, {self.path!r})"
