"""The baselines diffusion is measured against, trained by the same Trainer on the same data:
a Gaussian VAE (Kingma & Welling 2014) and a DCGAN (Radford, Metz & Chintala 2016).

Each is a component family (``vae``, ``dcgan``) with a training task (``[task] kind = "vae"`` /
``"gan"``) whose samples come from one decoder / generator pass, so ``difflab sample``,
``difflab eval`` and training previews treat them like any generative run.
"""

from difflab.baselines.dcgan import DCGAN, DCGANConfig
from difflab.baselines.vae import GaussianVAE, VAEConfig

__all__ = ["DCGAN", "DCGANConfig", "GaussianVAE", "VAEConfig"]
