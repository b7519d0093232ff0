"""High-accuracy reference solutions, independent of difflab's samplers."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from difflab.denoiser import DenoiserBase


def probability_flow_reference(
    den: DenoiserBase, x: torch.Tensor, t_start: float, t_end: float,
    rtol: float = 1e-11, atol: float = 1e-11,
) -> torch.Tensor:
    """Solve the probability-flow ODE ``dx/dt = d_alpha x0 + d_sigma eps`` with scipy's DOP853.

    This is ``f x - g^2 score / 2`` of Song et al. 2021 (eq. 13) written with the denoiser's
    prediction (``Prediction.velocity``), integrated in float64 from ``t_start`` down to
    ``t_end``; it shares nothing with difflab's samplers but the denoiser.
    """
    shape = x.shape
    n = shape[0]

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape)
        tt = torch.full((n,), t, dtype=torch.float64)
        return den(xt, tt).velocity.reshape(-1).numpy()

    sol = solve_ivp(rhs, (t_start, t_end), x.double().reshape(-1).numpy(), method="DOP853",
                    rtol=rtol, atol=atol)
    if not sol.success:  # pragma: no cover - scipy reports its own failure
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape)
