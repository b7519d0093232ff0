"""LDM's KL-regularised autoencoder (Rombach et al. 2022, Sec. 3 and App. G; the first stage of
Stable Diffusion).

Encoder: a 3x3 input convolution, ``len(block_channels)`` stages of ``layers_per_block``
residual blocks, each stage but the last ending in a stride-2 convolution (so the factor is
``f = 2 ** (len(block_channels) - 1)``), a middle of residual - self-attention - residual, then
GroupNorm, SiLU and a 3x3 convolution to ``2 c`` channels: the mean and log-variance of a
diagonal Gaussian posterior over ``c`` latent channels. A 1x1 ``quant_conv`` follows (LDM keeps
it from the VQ model; ``post_quant_conv`` mirrors it before the decoder). The decoder mirrors
the encoder with ``layers_per_block + 1`` residual blocks per stage and nearest-neighbour 2x
upsampling followed by a 3x3 convolution.

Module and parameter names follow the layout of Stable Diffusion's VAE in diffusers
(``encoder.down_blocks.0.resnets.0.conv1.weight``, ``encoder.mid_block.attentions.0.to_q``, ...),
so SD VAE weights load by name; tests/latent/test_autoencoder.py checks outputs against a tiny
``diffusers.AutoencoderKL`` with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.components import Family, image_fields, register_family
from difflab.latent.codec import Codec, DiagonalGaussian

__all__ = ["AutoencoderKL", "AutoencoderKLConfig", "PRESETS"]

EPS = 1e-6  # GroupNorm epsilon of LDM's first stage


@dataclass(frozen=True)
class AutoencoderKLConfig:
    """Fields of :class:`AutoencoderKL`.

    Attributes:
        in_channels: image channels (the decoder outputs ``out_channels``, default the same).
        image_size: side of the training images (for the latent shape; any multiple of the
            factor works at run time).
        block_channels: channels per stage; the factor is ``2 ** (len - 1)`` (f = 4: three
            stages, f = 8: four, as SD).
        layers_per_block: residual blocks per encoder stage (the decoder has one more).
        latent_channels: ``c`` (SD: 4).
        groups: GroupNorm groups (SD: 32); must divide every stage's channels.
        mid_attention: the self-attention block in the middle of encoder and decoder.
        out_channels: decoder output channels (None: ``in_channels``).
    """

    in_channels: int = 3
    image_size: int = 64
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    groups: int = 8
    mid_attention: bool = True
    out_channels: int | None = None

    def __post_init__(self) -> None:
        if self.in_channels < 1 or (self.out_channels is not None and self.out_channels < 1):
            raise ValueError("in_channels / out_channels must be at least 1")
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            raise ValueError(f"block_channels={list(self.block_channels)}: expected one or more "
                             "positive channel counts")
        bad = [c for c in self.block_channels if c % self.groups]
        if self.groups < 1 or bad:
            raise ValueError(f"groups={self.groups} must divide every entry of block_channels "
                             f"{list(self.block_channels)}")
        if self.layers_per_block < 1 or self.latent_channels < 1:
            raise ValueError("layers_per_block and latent_channels must be at least 1")
        if self.image_size < 1 or self.image_size % self.factor:
            raise ValueError(f"image_size={self.image_size} must be a multiple of the factor "
                             f"{self.factor} (2 ** (len(block_channels) - 1))")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


PRESETS = {
    # CPU-sized: f = 4, 4 latent channels (configs/ae_kl_emoji.toml)
    "small": AutoencoderKLConfig(),
    "tiny": AutoencoderKLConfig(block_channels=(8, 16, 16), groups=4, image_size=16),
    # Stable Diffusion v1 / v2's VAE (f = 8, 4 latent channels, 83.7 M parameters)
    "sd": AutoencoderKLConfig(image_size=512, block_channels=(128, 256, 512, 512),
                              layers_per_block=2, groups=32),
}


class ResnetBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1x1 shortcut when channels change
    (LDM's first-stage ResnetBlock, no time embedding)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the ``h w`` positions with a residual (LDM's AttnBlock):
    ``x + W_o softmax(q k^T / sqrt(C)) v`` on ``GN(x)``."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom (LDM)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """Residual blocks, then an optional resampler (``downsamplers`` / ``upsamplers``)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None
                 ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups)
                                      for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", ()):
            x = s(x)
        for s in getattr(self, "upsamplers", ()):
            x = s(x)
        return x


class Encoder(nn.Module):
    """The first-stage encoder; ``double_z``: ``2 c`` output channels (a Gaussian's mean and
    log-variance), else ``c`` (the VQ model's pre-quantisation latent)."""

    def __init__(self, c: AutoencoderKLConfig, double_z: bool = True) -> None:
        super().__init__()
        ch = c.block_channels
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.groups,
                  "down" if i < len(ch) - 1 else None) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], c.groups, c.mid_attention)
        self.conv_norm_out = nn.GroupNorm(c.groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], (2 if double_z else 1) * c.latent_channels, 3,
                                  padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig) -> None:
        super().__init__()
        ch = tuple(reversed(c.block_channels))
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], c.groups, c.mid_attention)
        self.up_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c.groups,
                  "up" if i < len(ch) - 1 else None) for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(c.groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels or c.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for stage in self.up_blocks:
            h = stage(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(Codec):
    """LDM's KL autoencoder (see the module docstring): ``encode(x)`` gives the posterior
    :class:`DiagonalGaussian`, ``decode(z)`` the image, ``forward(x)`` the reconstruction of a
    posterior sample with the posterior."""

    def __init__(self, config: AutoencoderKLConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or AutoencoderKLConfig()
        self.factor = c.factor
        self.latent_channels = c.latent_channels
        self.image_channels = c.in_channels
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(c.latent_channels, c.latent_channels, 1)

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        self._check(x, self.image_channels, "AutoencoderKL.encode")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"AutoencoderKL.encode: image sides {tuple(x.shape[-2:])} must be "
                             f"multiples of the factor {self.factor}")
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.latent_channels, "AutoencoderKL.decode")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[Tensor, DiagonalGaussian]:
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return self.decode(z), post

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output weight, where LDM's adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight


def _shape(c: AutoencoderKLConfig) -> tuple[int, ...]:
    return (c.in_channels, c.image_size, c.image_size)


FAMILY = register_family(Family(
    name="autoencoder_kl", config=AutoencoderKLConfig, build=AutoencoderKL, kind="codec",
    presets=PRESETS, default_preset="small", resolve=image_fields, input_shape=_shape,
    doc="LDM's KL autoencoder (SD's VAE layout): the first stage of latent diffusion"))


