"""difflab: the classic diffusion-model family in one coherent, tested PyTorch library."""

from difflab.cond import Cond, Control
from difflab.denoiser import Denoiser, DenoiserBase, EDMPrecond, FnDenoiser
from difflab.errors import DifflabError
from difflab.paths import EDM, GVP, VE, VP, GaussianPath, Linear, SubVP
from difflab.prediction import KINDS, Prediction

__version__ = "0.1.0"

__all__ = [
    "EDM",
    "GVP",
    "KINDS",
    "VE",
    "VP",
    "Cond",
    "Control",
    "Denoiser",
    "DenoiserBase",
    "DifflabError",
    "EDMPrecond",
    "FnDenoiser",
    "GaussianPath",
    "Linear",
    "Prediction",
    "SubVP",
    "__version__",
]
