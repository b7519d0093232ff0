"""The feature-extractor interface every metric reads (:class:`FeatureExtractor`) and the
cache folder; :mod:`.features` (the extractors difflab trains) and :mod:`.inception` (the
published Inception-v3 features) both build on it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.errors import DifflabError, bad_value


def cache_dir() -> Path:
    """``$DIFFLAB_CACHE`` or ``~/.cache/difflab``."""
    env = os.environ.get("DIFFLAB_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "difflab"


class FeatureExtractor:
    """A trained feature network with input checks and batching.

    Attributes:
        name: registry name.
        net: the network (eval mode).
        meta: what training recorded: held-out ``score`` (accuracy or PSNR), ``train_seconds``,
            ``n_train``, ``n_holdout``, ``key``.
    """

    def __init__(self, name: str, net: torch.nn.Module, channels: int | None,
                 image_size: int | None, dim: int, meta: dict | None = None,
                 has_logits: bool = True) -> None:
        self.name, self.net, self.dim = name, net.eval(), dim
        self.channels, self.image_size = channels, image_size
        self.meta = dict(meta or {})
        self.has_logits = has_logits
        self.resize_inputs = False

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` as float32 ``(N, C, H, W)`` if this extractor accepts their shape.

        With ``resize_inputs = True`` square images of another size are resized (bilinear,
        antialiased) to the extractor's; apply it to real and generated images alike.
        """
        x = torch.as_tensor(images)
        if x.ndim != 4:
            raise bad_value("images.shape", tuple(x.shape), "(N, C, H, W) images in [-1, 1]")
        c, s = self.channels, self.image_size
        if (self.resize_inputs and s is not None and x.shape[-1] == x.shape[-2]
                and x.shape[-2:] != (s, s)):
            x = torch.nn.functional.interpolate(x.float(), size=(s, s), mode="bilinear",
                                                align_corners=False, antialias=True)
        if (c is not None and x.shape[1] != c) or (s is not None and x.shape[-2:] != (s, s)):
            raise DifflabError(
                f"extractor {self.name!r} expects ({c}, {s}, {s}) images, got "
                f"{tuple(x.shape[1:])}: evaluate samples at the resolution it was trained on "
                "(or set resize_inputs = True to resize both real and generated images)")
        return x.to(torch.float32)

    @torch.no_grad()
    def _apply(self, fn, images, batch_size: int, progress: bool, desc: str) -> torch.Tensor:
        x = self.check_images(images)
        out = [fn(b) for b in tqdm(x.split(batch_size), desc=desc, disable=not progress,
                                   unit="batch")]
        return torch.cat(out).to(torch.float64) if out else torch.empty(0, self.dim)

    def features(self, images: torch.Tensor, batch_size: int = 500,
                 progress: bool = False) -> torch.Tensor:
        """Penultimate-layer features ``(N, D)`` (float64) of images in ``[-1, 1]``."""
        return self._apply(self.net.features, images, batch_size, progress,
                           f"features ({self.name})")

    def logits(self, images: torch.Tensor, batch_size: int = 500,
               progress: bool = False) -> torch.Tensor:
        """Class logits ``(N, C)`` (float64), for the Inception Score."""
        if not self.has_logits:
            raise DifflabError(f"extractor {self.name!r} has no class logits, so no Inception "
                               "Score; use a classifier extractor")
        return self._apply(self.net.logits, images, batch_size, progress, f"logits ({self.name})")
