"""High-accuracy reference solutions, independent of difflab's samplers."""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from difflab.denoiser import DenoiserBase


def probability_flow_reference(
    den: DenoiserBase, x: torch.Tensor, t_start: float, t_end: float,
    rtol: float = 1e-10, atol: float = 1e-10,
) -> torch.Tensor:
    """Solve the probability-flow ODE from ``t_start`` down to ``t_end > 0`` with scipy's DOP853.

    The ODE ``dx/dt = f x - g^2 score / 2`` (Song et al. 2021, eq. 13) is integrated in the
    half log-SNR ``lambda = log(alpha / sigma)``, where it reads
    ``d(x / sigma) / d lambda = exp(lambda) x0_hat(x, t(lambda))`` (Lu et al. 2022b, eq. 9).
    In this variable the right-hand side is smooth even on a discrete DDPM path, whose
    piecewise-linear ``log alpha(t)`` has a kink at every step and would force a ``t``-integrator
    into tiny steps. Everything is float64; nothing is shared with difflab's samplers but the
    denoiser and the path.
    """
    path = den.path
    shape, n = x.shape, x.shape[0]
    lam0 = 0.5 * float(path.log_snr(float(t_start)))
    lam1 = 0.5 * float(path.log_snr(float(t_end)))
    s0 = float(path.sigma(float(t_start)))

    def rhs(lam: float, y: np.ndarray) -> np.ndarray:
        t = path.t_from_log_snr(torch.tensor(2.0 * lam, dtype=torch.float64))
        t = t.clamp(path.t_min, path.t_max)
        xt = torch.from_numpy(y).reshape(shape) * path.sigma(t)
        x0 = den(xt, t.expand(n)).x0
        return (np.exp(lam) * x0).reshape(-1).numpy()

    y0 = (x.double() / s0).reshape(-1).numpy()
    sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:  # pragma: no cover - scipy reports its own failure
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).reshape(shape) * float(path.sigma(float(t_end)))
