"""Oracles that know the exact answer; they ship with difflab so users can test their own code."""

from difflab.testing.counting import CountingDenoiser
from difflab.testing.mixture import GaussianMixture
from difflab.testing.reference import probability_flow_reference

__all__ = ["CountingDenoiser", "GaussianMixture", "probability_flow_reference"]
