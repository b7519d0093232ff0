"""A denoiser wrapper that counts its evaluations (for checking samplers' NFE claims)."""

from __future__ import annotations

from difflab.denoiser import DenoiserBase


class CountingDenoiser(DenoiserBase):
    """Wraps ``den`` and counts its calls in ``calls``; the predictions are ``den``'s own."""

    def __init__(self, den: DenoiserBase) -> None:
        self.den, self.path, self.calls = den, den.path, 0

    def predict(self, x, t):
        self.calls += 1
        return self.den.predict(x, t)
