"""Semantic Diffusion Guidance (Liu et al. 2023, "More Control for Free!", WACV, Sec. 3-4).

SDG steers any diffusion model with the gradient of a similarity ``F(x_t, y, t)`` computed by a
noise-aware image-text model on the *noisy* sample (Sec. 3): the reverse mean moves by
``s Sigma grad_{x_t} F``, i.e. the score gains ``s grad F``. With
:func:`difflab.guidance.energy` on ``x_t`` and the energy ``E = -F`` that is exactly
``eps <- eps + sigma s grad E`` (the sampler then does the rest). The three guidances (Sec. 3-4):

* language: ``F = cos(E_I'(x_t, t), E_L(l))``, the noisy-image embedding against the
  text embedding;
* image content: ``F = cos(E_I'(x_t, t), E_I'(x'_t, t))``, where ``x'_t`` is the
  reference image noised to the same ``t`` (here with noise fixed once, so the guide is a
  deterministic function of ``(x_t, t)``);
* image style: ``F = -sum_l mean_cd (G(f_l(x_t)) - G(f_l(x'_t)))_cd^2`` with ``G`` the Gram
  matrix of the image tower's intermediate feature maps ``f_l`` (Gatys et al. 2016).

Every energy takes and returns path time: ``model`` is a
:class:`~difflab.networks.noisy.NoisyModel` wrapping an
:class:`~difflab.networks.alignment.AlignmentModel`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.denoiser import DenoiserBase
from difflab.errors import DifflabError, bad_value
from difflab.guidance.transforms import Guided, energy
from difflab.networks.noisy import NoisyModel
from difflab.paths.base import as_time, same_marginals

__all__ = ["alignment_score", "content_energy", "gram", "sdg", "style_energy", "text_energy"]

Energy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KINDS = ("text", "content", "style")


def gram(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``G = f f^T / (H W)`` ``(B, C, C)`` of a feature map ``f (B, C, H, W)``.

    ``G_cd = mean over positions of f_c f_d``: it forgets *where* features occur, so it is
    unchanged by any permutation of the spatial positions (Gatys et al. 2016).
    """
    f = features.flatten(2)  # (B, C, HW)
    return f @ f.transpose(1, 2) / f.shape[2]  # (B, C, C)


def _check_model(model: NoisyModel) -> NoisyModel:
    net = getattr(model, "net", None)
    if not isinstance(model, NoisyModel) or not hasattr(net, "text_embed"):
        raise DifflabError(
            "SDG needs model=NoisyModel(AlignmentModel(config), path) (path time in, unit "
            f"embeddings out); got {model!r}"
        )
    return model


def _time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = as_time(t).to(x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def _batch(ref: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``ref`` in ``x``'s dtype and device, its batch of 1 (or B) broadcast to ``x``'s."""
    ref = ref.to(dtype=x.dtype, device=x.device)
    if ref.shape[1:] != x.shape[1:] or ref.shape[0] not in (1, x.shape[0]):
        raise DifflabError(
            f"{name} has shape {tuple(ref.shape)} but x_t has shape {tuple(x.shape)}: expected "
            f"(1, ...) or ({x.shape[0]}, ...) with the same image shape"
        )
    return ref.expand_as(x)


def text_energy(model: NoisyModel, text_emb: torch.Tensor) -> Energy:
    """Language guidance (SDG Sec. 3-4): ``E(x_t, t) = -cos(E_I'(x_t, t), E_L(l))`` ``(B,)``.

    Args:
        model: the noise-aware alignment model in path time.
        text_emb: frozen sentence embeddings ``(1 or B, text_dim)``.
    """
    net = _check_model(model).net
    if not isinstance(text_emb, torch.Tensor) or text_emb.ndim != 2:
        raise bad_value("text_emb", text_emb, "a tensor of sentence embeddings (1 or B, text_dim)")

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        image = model(x_t, _time(t, x_t))  # (B, E), unit
        text = net.text_embed(text_emb).to(image.dtype)  # (1 or B, E), unit
        if text.shape[0] not in (1, image.shape[0]):
            raise DifflabError(
                f"text_emb has {text.shape[0]} rows for a batch of {image.shape[0]} images: "
                "expected 1 (shared) or one per image"
            )
        return -(image * text).sum(dim=-1)  # (B,)

    return fn


class _NoisedReference:
    """``x'_t = alpha(t) x'_0 + sigma(t) eps'`` with ``eps'`` drawn once (SDG Sec. 3-4)."""

    def __init__(self, ref_x0: torch.Tensor, noise: torch.Tensor | None,
                 generator: torch.Generator | int | None) -> None:
        if not isinstance(ref_x0, torch.Tensor) or not ref_x0.is_floating_point():
            raise bad_value("ref_x0", ref_x0, "a floating-point image batch (1 or B, C, H, W)")
        if noise is None:
            if isinstance(generator, int):
                generator = torch.Generator(device=ref_x0.device).manual_seed(generator)
            noise = torch.randn(ref_x0.shape, generator=generator, dtype=ref_x0.dtype,
                                device=ref_x0.device)
        elif noise.shape != ref_x0.shape:
            raise DifflabError(
                f"noise has shape {tuple(noise.shape)} but ref_x0 has shape "
                f"{tuple(ref_x0.shape)}: expected equal shapes"
            )
        self.ref_x0, self.noise = ref_x0, noise

    def at(self, path, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ref = _batch(self.ref_x0, x_t, "ref_x0")
        noise = _batch(self.noise, x_t, "noise")
        return path.add_noise(ref, noise, t).detach()  # (B, C, H, W): a constant of the guide


def content_energy(model: NoisyModel, ref_x0: torch.Tensor, *, noise: torch.Tensor | None = None,
                   generator: torch.Generator | int | None = 0) -> Energy:
    """Image content guidance (SDG Sec. 3-4): ``E = -cos(E_I'(x_t, t), E_I'(x'_t, t))``.

    ``x'_t`` is the reference noised to the same ``t`` with noise fixed here (``noise``, or drawn
    once from ``generator``, an int being a seed). At ``x_t = x'_t`` the similarity is 1, its
    maximum, so the guidance gradient vanishes there.

    Args:
        model: the noise-aware alignment model in path time.
        ref_x0: clean reference images ``(1 or B, C, H, W)``.
        noise: the reference's noise ``eps'`` (shape of ``ref_x0``).
        generator: where ``eps'`` is drawn from when ``noise`` is None.
    """
    def cosine(emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(emb * target).sum(dim=-1)  # (B,): both unit vectors (B, E)

    return _reference_energy(model, ref_x0, noise, generator, model, cosine)


def style_energy(model: NoisyModel, ref_x0: torch.Tensor, *, noise: torch.Tensor | None = None,
                 generator: torch.Generator | int | None = 0) -> Energy:
    """Image style guidance (SDG Sec. 3-4): ``E = sum_l mean_cd (G_l(x_t) - G_l(x'_t))_cd^2``.

    ``G_l`` is :func:`gram` of the ``l``-th feature map of ``model.net.image_features`` (one per
    resolution level); the mean over the ``C_l^2`` entries keeps the levels comparable. The
    reference is noised as in :func:`content_energy`. The energy is zero (its minimum) at
    ``x_t = x'_t`` and depends on the reference only through Gram matrices, i.e. not on where
    its features occur.

    Args:
        model: the noise-aware alignment model in path time.
        ref_x0: clean reference images ``(1 or B, C, H, W)``.
        noise: the reference's noise ``eps'`` (shape of ``ref_x0``).
        generator: where ``eps'`` is drawn from when ``noise`` is None.
    """
    def grams(x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        return [gram(f) for f in model.net.image_features(x, model.time_input(t).float())]

    def distance(g: list[torch.Tensor], g_ref: list[torch.Tensor]) -> torch.Tensor:
        return sum((a - b).pow(2).mean(dim=(1, 2)) for a, b in zip(g, g_ref))  # (B,)

    return _reference_energy(model, ref_x0, noise, generator, grams, distance)


def _reference_energy(model: NoisyModel, ref_x0, noise, generator, embed, distance) -> Energy:
    """``E(x_t, t) = distance(embed(x_t, t), embed(x'_t, t))`` with ``x'_t`` the reference noised
    to ``t`` (fixed noise); the reference side is a constant of the guide (no gradient)."""
    _check_model(model)
    reference = _NoisedReference(ref_x0, noise, generator)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _time(t, x_t)
        with torch.no_grad():
            target = embed(reference.at(model.path, x_t, t), t)
        return distance(embed(x_t, t), target)

    return fn


def sdg(den: DenoiserBase, model: NoisyModel, *, text_emb: torch.Tensor | None = None,
        ref: torch.Tensor | None = None, kind: str = "text", scale: float,
        noise: torch.Tensor | None = None, generator: torch.Generator | int | None = 0) -> Guided:
    """A denoiser guided by SDG (Sec. 3): ``energy(den, E, scale, on="xt")``.

    Args:
        den: the (bound) diffusion denoiser; it must share ``model``'s path.
        model: the noise-aware alignment model in path time.
        text_emb: sentence embeddings for ``kind="text"``.
        ref: clean reference images for ``kind="content"`` / ``"style"``.
        kind: ``text``, ``content`` or ``style``.
        scale: the guidance scale ``s``.
        noise, generator: the reference's fixed noise (see :func:`content_energy`).
    """
    if kind not in KINDS:
        raise bad_value("kind", kind, "one of " + ", ".join(repr(k) for k in KINDS))
    _check_model(model)
    if not same_marginals(den.path, model.path):
        raise DifflabError(
            f"the denoiser's path {den.path!r} and the alignment model's path {model.path!r} "
            "differ: the guide must read x_t from the same forward process"
        )
    if kind == "text":
        if text_emb is None or ref is not None:
            raise DifflabError("kind='text' needs text_emb (and no ref)")
        fn = text_energy(model, text_emb)
    else:
        if ref is None or text_emb is not None:
            raise DifflabError(f"kind={kind!r} needs ref, the reference images (and no text_emb)")
        make = content_energy if kind == "content" else style_energy
        fn = make(model, ref, noise=noise, generator=generator)
    guided = energy(den, fn, scale, on="xt")
    guided.name = f"sdg({kind}, scale={float(scale):g})"
    return guided


@torch.no_grad()
def alignment_score(model: NoisyModel, images: torch.Tensor, text_emb: torch.Tensor,
                    t: torch.Tensor | float | None = None) -> torch.Tensor:
    """Cosine similarity ``(B,)`` of images and texts, read as ``x_t`` at time ``t``.

    For evaluation: ``t`` defaults to the path's smallest time ``t_min`` (the clean end); the
    images are fed as they are (no noise is added).

    Args:
        model: the noise-aware alignment model in path time.
        images: ``(B, C, H, W)``.
        text_emb: sentence embeddings ``(1 or B, text_dim)``.
        t: the time the images are read at (default ``model.path.t_min``).
    """
    _check_model(model)
    t = model.path.t_min if t is None else t
    return -text_energy(model, text_emb)(images, _time(t, images))

