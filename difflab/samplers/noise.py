"""Noise sources: the only randomness a sampler sees (an object with ``randn_like``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.errors import DifflabError


class GeneratorNoise:
    """Gaussian noise from one ``torch.Generator`` (or the global RNG when None)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @classmethod
    def seeded(cls, seed: int) -> GeneratorNoise:
        return cls(torch.Generator().manual_seed(int(seed)))

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        return z.to(x.device)


class PerSampleNoise:
    """One stream per batch row, so sample ``i`` is the same whatever the batch size.

    Args:
        seeds: one integer seed per row (e.g. ``range(start, start + n)``).
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise DifflabError("PerSampleNoise needs at least one seed")
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise DifflabError(
                f"PerSampleNoise has {len(self.generators)} seeds but the batch has "
                f"{x.shape[0]} rows: expected one seed per row"
            )
        rows = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in self.generators]
        return torch.stack(rows).to(x.device)

    def __getitem__(self, idx: slice) -> PerSampleNoise:
        """Noise for a sub-batch (fresh streams from the same seeds)."""
        return PerSampleNoise(self.seeds[idx])


def as_noise(noise) -> GeneratorNoise | PerSampleNoise:
    """Accept None (global RNG), an int seed, a ``torch.Generator`` or a noise object."""
    if noise is None:
        return GeneratorNoise()
    if isinstance(noise, int):
        return GeneratorNoise.seeded(noise)
    if isinstance(noise, torch.Generator):
        return GeneratorNoise(noise)
    if hasattr(noise, "randn_like"):
        return noise
    raise DifflabError(
        f"noise={noise!r} is not valid: expected None, an int seed, a torch.Generator, "
        "or an object with randn_like(x)"
    )
