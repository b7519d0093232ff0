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

# The application layer, imported on first use (``import difflab`` stays light).
_LAZY = {
    "build": "difflab.components", "save": "difflab.components", "load": "difflab.interop",
    "register_family": "difflab.components", "families": "difflab.components",
    "Family": "difflab.components", "DataSpec": "difflab.components",
    "SampleRequest": "difflab.sampling", "Samples": "difflab.sampling",
    "generate": "difflab.sampling", "load_run": "difflab.runs",
    "LoadedRun": "difflab.runs", "register_task": "difflab.tasks",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'difflab' has no attribute {name!r}")
