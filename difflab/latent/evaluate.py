"""How well a codec reconstructs held-out images: PSNR, SSIM and rFID (LDM Tab. 8 reports the
same three for its first stages), plus what its latents look like.

- PSNR: ``10 log10(L^2 / MSE)`` per image with ``L = 2`` (images in ``[-1, 1]``), averaged.
- SSIM (Wang et al. 2004, eq. 13): means, variances and covariance under an 11x11 Gaussian
  window of std 1.5 over every position where the window fits, ``C1 = (0.01 L)^2``,
  ``C2 = (0.03 L)^2``, averaged over positions and channels, then over images.
- rFID: the FID between the held-out images and their reconstructions on the features of the
  dataset's difflab-trained extractor, with the real-versus-real floor at the same size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab.latent.codec import Codec

__all__ = ["psnr", "reconstruct", "reconstruction_report", "ssim"]

DATA_RANGE = 2.0


def psnr(x: Tensor, y: Tensor, data_range: float = DATA_RANGE) -> Tensor:
    """Per-image PSNR in dB ``(B,)``."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-20))


def _gaussian_window(size: int, sigma: float, channels: int) -> Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, y: Tensor, data_range: float = DATA_RANGE, window: int = 11,
         sigma: float = 1.5, padding: str = "valid") -> Tensor:
    """Per-image SSIM ``(B,)`` (see the module docstring). ``padding="valid"`` averages over
    the positions where the window fits (Wang et al.; scikit-image); ``"reflect"`` pads the
    images by reflection and averages over every position (torchmetrics)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim: expected two (B, C, H, W) tensors of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the "
                         f"{window}x{window} window")
    if padding not in ("valid", "reflect"):
        raise ValueError(f"ssim: padding={padding!r}, expected 'valid' or 'reflect'")
    x, y = x.double(), y.double()
    if padding == "reflect":
        pad = (window - 1) // 2
        x = F.pad(x, (pad,) * 4, mode="reflect")
        y = F.pad(y, (pad,) * 4, mode="reflect")
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c).to(x.device)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx ** 2).clamp_min(0)
    vy = (blur(y * y) - my ** 2).clamp_min(0)
    cxy = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruct(codec: Codec, images: Tensor, batch_size: int = 64,
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """``(reconstructions, scaled latents)`` of ``images`` through the posterior means."""
    codec = codec.to(device).eval()
    recs, zs = [], []
    for b in images.split(batch_size):
        z = codec.to_latent(b.to(device), sample=False)
        recs.append(codec.from_latent(z).float().cpu())
        zs.append(z.float().cpu())
    return torch.cat(recs), torch.cat(zs)


def reconstruction_report(codec: Codec, images: Tensor, extractor=None,
                          generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> dict:
    """PSNR, SSIM, rFID (with its floor, when ``extractor`` is given) and latent statistics of
    ``codec`` on ``images``; each score with its mean and standard error."""
    from difflab.evaluation.metrics import fid_floor, fid_from_features

    rec, z = reconstruct(codec, images, device=device)
    rec = rec.clamp(-1, 1)

    def summary(v: Tensor) -> dict:
        v = v.double()
        se = float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else None
        return {"value": float(v.mean()), "stderr": se, "n": int(v.numel())}

    out = {"n": int(images.shape[0]), "psnr_db": summary(psnr(rec, images)),
           "latent": {"shape": list(z.shape[1:]), "factor": codec.factor,
                      "scale_factor": float(codec.scale_factor),
                      "shift": float(codec.shift),
                      "scaled_std": float(z.double().std()),
                      "scaled_mean": float(z.double().mean())}}
    if hasattr(codec, "codebook_usage"):  # a VQ model: how much of its codebook it uses
        out["codebook"] = codec.codebook_usage(images.to(device))
    if min(images.shape[-2:]) >= 11:
        out["ssim"] = summary(ssim(rec, images))
    if extractor is not None:
        real = extractor.features(images)
        fake = extractor.features(rec)
        out["rfid"] = fid_from_features(real, fake, "rFID").to_dict()
        out["rfid_floor"] = fid_floor(real, generator).to_dict()
        out["extractor"] = extractor.meta
    return out


def render(report: dict) -> str:
    """``report.md`` of a codec evaluation."""
    r = report["reconstruction"]
    lines = [f"# Reconstruction of {report['run']} (step {report['step']})", "",
             f"{r['n']} {report['data']}, posterior means decoded, clamped to [-1, 1].", "",
             "| metric | value |", "|---|---|"]

    def cell(d: dict, unit: str = "") -> str:
        se = d.get("stderr")
        return f"{d['value']:.4g}{unit}" + (f" ± {se:.2g}" if se else "")

    lines.append(f"| PSNR | {cell(r['psnr_db'], ' dB')} |")
    if "ssim" in r:
        lines.append(f"| SSIM | {cell(r['ssim'])} |")
    if "rfid" in r:
        lines.append(f"| rFID | {r['rfid']['value']:.4g} (floor {r['rfid_floor']['value']:.4g},"
                     f" {r['extractor'].get('name', '?')} features) |")
    if "codebook" in r:
        cb = r["codebook"]
        lines.append(f"| codebook usage | {cb['used']} of {cb['codes']} codes "
                     f"({100 * cb['used_fraction']:.1f}%), perplexity {cb['perplexity']:.1f} |")
    lat = r["latent"]
    lines += ["", f"Latents: {tuple(lat['shape'])} (factor {lat['factor']}), scale factor "
              f"{lat['scale_factor']:.5g}, shift {lat['shift']:.3g}; the scaled posterior means "
              f"have std {lat['scaled_std']:.3f} and mean {lat['scaled_mean']:.3f}.", ""]
    if "rfid" in r:
        lines += ["rFID compares the images with their own reconstructions (two paired sets of "
                  f"{r['n']}); the floor compares two disjoint halves of the real images "
                  f"({r['n'] // 2} each), so it shows the FID's bias at that size, not a lower "
                  "bound for rFID.", ""]
    lines += [f"- {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"

