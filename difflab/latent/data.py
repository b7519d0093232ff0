"""Training data of a latent diffusion run: images encoded by a frozen codec.

LDM (Rombach et al. 2022, Sec. 3) trains the diffusion model on ``z ~ q(z | x)`` of the frozen
first stage, scaled to unit variance. The encoder is deterministic, so the posterior *moments*
of every training image can be computed once (:func:`cached_moments`) and a fresh ``z`` drawn
from them at every step (:func:`latent_batch`): exactly what encoding each batch again would
give, without the encoder's cost. The cache lives in ``$DIFFLAB_CACHE/latents``, named by the
SHA-256 of the codec's weights and of the images, so a changed codec or changed data never
reads a stale file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from difflab.data.base import ImageDataset
from difflab.errors import DifflabError
from difflab.latent.codec import Codec, DiagonalGaussian

__all__ = ["LatentMoments", "cached_moments", "latent_batch"]

logger = logging.getLogger("difflab.training")


class LatentMoments(ImageDataset):
    """The posterior moments ``(2c, h, w)`` (mean, then log-variance) of every image of
    ``base``, with ``base``'s labels and captions."""

    def __init__(self, moments: Tensor, base: ImageDataset) -> None:
        if moments.shape[0] != len(base):
            raise DifflabError(f"latent cache holds {moments.shape[0]} items, the data "
                               f"{len(base)}")
        self.moments = moments.contiguous()
        self.base = base
        self.name = base.name
        self.channels = int(moments.shape[1])
        self.image_size = int(moments.shape[-1])
        self.num_classes = base.num_classes
        self.class_names = base.class_names
        self.captions = getattr(base, "captions", None)

    def __len__(self) -> int:
        return self.moments.shape[0]

    def _image(self, index: int) -> Tensor:
        return self.moments[index]

    def _info(self, index: int):
        return self.base._info(index)


def _images(dataset: ImageDataset, batch_size: int):
    for lo in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(lo, min(lo + batch_size, len(dataset)))])


def images_hash(dataset: ImageDataset, batch_size: int = 256) -> str:
    """SHA-256 of every image of ``dataset`` (float32 bytes, in order) and its length."""
    h = hashlib.sha256(f"{len(dataset)}".encode())
    for x in _images(dataset, batch_size):
        h.update(x.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def encode_moments(codec: Codec, dataset: ImageDataset, device: torch.device | str = "cpu",
                   batch_size: int = 64, progress: bool | None = None) -> Tensor:
    """``(N, 2c, h, w)`` float32 posterior moments of every image of ``dataset``, on the CPU."""
    from tqdm.auto import tqdm

    codec = codec.to(device)
    show = progress if progress is not None else len(dataset) > 4 * batch_size
    out = []
    total = -(-len(dataset) // batch_size)
    for x in tqdm(_images(dataset, batch_size), total=total, desc="encoding latents",
                  disable=not show, leave=False, unit="batch"):
        post = codec.encode(x.to(device))
        out.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
    return torch.cat(out)


def cached_moments(codec: Codec, codec_hash: str, dataset: ImageDataset,
                   root: Path | None = None, device: torch.device | str = "cpu",
                   progress: bool | None = None) -> tuple[LatentMoments, Path]:
    """The :class:`LatentMoments` of ``dataset`` under ``codec``, from
    ``root/latents/<key>.safetensors`` when it was encoded before (else encoded and written
    there atomically). ``key`` hashes the codec's content hash and the images."""
    from safetensors.torch import load_file

    from difflab.evaluation.extractor import cache_dir
    from difflab.fileio import publish, save_safetensors

    if getattr(dataset, "transform", None) is not None:
        raise DifflabError("codec.cache=true with a data transform: the latents of augmented "
                           "images differ at every step, so they cannot be encoded once; set "
                           "codec.cache=false")
    key = hashlib.sha256(f"{codec_hash}:{images_hash(dataset)}".encode()).hexdigest()[:24]
    file = (root or cache_dir()) / "latents" / f"{key}.safetensors"
    if file.is_file():
        try:
            moments = load_file(str(file))["moments"]
            logger.info("latents of %d images read from %s", len(dataset), file)
            return LatentMoments(moments, dataset), file
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            logger.warning("latent cache %s unreadable (%s): encoding again", file, e)
    moments = encode_moments(codec, dataset, device, progress=progress)
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
    os.close(fd)
    try:
        save_safetensors({"moments": moments}, tmp, metadata={"codec_sha256": codec_hash,
                                                             "n": str(len(dataset))})
        publish(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("latents of %d images encoded into %s", len(dataset), file)
    return LatentMoments(moments, dataset), file


def latent_batch(codec: Codec, x: Tensor, generator: torch.Generator | None,
                 sample: bool = True, cached: bool = False) -> Tensor:
    """The scaled latents of a training batch: ``x`` is images (encoded here, no gradient) or,
    with ``cached``, their posterior moments; a posterior sample from ``generator`` (or the
    mean), minus the codec's ``shift``, times its ``scale_factor``."""
    if cached:
        post = DiagonalGaussian.from_moments(x)
    else:
        with torch.no_grad():
            post = codec.encode(x)
    z = post.sample(generator) if sample else post.mode()
    return (z - codec.shift) * codec.scale_factor
