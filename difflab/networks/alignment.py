"""A noise-aware image-text alignment model: the guide of Semantic Diffusion Guidance.

Liu et al. 2023 ("More Control for Free! Image Synthesis with Semantic Diffusion Guidance",
WACV, Sec. 3-4) guide a diffusion model with the gradient of a similarity between the *noisy*
image ``x_t`` and a text or a reference image. Their guide is CLIP (Radford et al. 2021)
fine-tuned on noised images, so that it reads ``x_t`` at every ``t``. This is the small-scale
version: a time-conditioned convolutional image tower (the U-Net encoder's blocks, as ADM's
noise-aware classifier, Dhariwal & Nichol 2021 Sec. 4), a trainable projection of frozen
sentence embeddings (all-MiniLM-L6-v2, 384-d), both mapped to a shared unit sphere, and CLIP's
learnable temperature. It is trained with :class:`difflab.objectives.contrastive.ContrastiveLoss`
and used through :class:`difflab.networks.noisy.NoisyModel` (path time -> network time).

The file reads top to bottom: the configuration, the model, then its size presets. Every ``t``
here is the network's own time signal (``NoisyModel`` converts path time).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.components import DataSpec, Family, image_shape, register_family
from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value
from difflab.networks.layers import (
    ResBlock,
    TimeEmbedding,
    check_image_and_time,
    preset_config,
    silu_,
)
from difflab.networks.trunk import EncoderTrunk, TrunkSpec

__all__ = ["AlignmentConfig", "AlignmentModel", "LOGIT_SCALE_INIT", "LOGIT_SCALE_MAX"]

# CLIP (Radford et al. 2021, Sec. 2.5): the temperature is learned as a log-parameterised
# multiplicative scalar, initialised to 1 / 0.07 and clipped so the logits are scaled by at
# most 100.
LOGIT_SCALE_INIT = math.log(1.0 / 0.07)
LOGIT_SCALE_MAX = 100.0


@dataclass
class AlignmentConfig:
    """Hyper-parameters of :class:`AlignmentModel`.

    Attributes:
        image_size: training resolution (other sizes divisible by ``downsample_factor`` work:
            the tower ends in global average pooling).
        in_channels: channels of ``x_t``.
        text_dim: width of the frozen sentence embeddings (384 for all-MiniLM-L6-v2).
        embed_dim: width of the shared embedding space.
        model_channels: base width of the image tower; level ``i`` has
            ``model_channels * channel_mult[i]`` channels.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level (a downsampling block follows every level
            but the last).
        dropout: dropout inside the residual blocks.
    """

    image_size: int = 32
    in_channels: int = 3
    text_dim: int = 384
    embed_dim: int = 128
    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise bad_value("channel_mult", self.channel_mult, "a non-empty tuple of ints >= 1")
        for name in ("image_size", "in_channels", "text_dim", "embed_dim", "model_channels",
                     "num_res_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad_value(name, value, "a positive int")
        if not 0.0 <= self.dropout < 1.0:
            raise bad_value("dropout", self.dropout, "a number in [0, 1)")
        if self.image_size % self.downsample_factor:
            raise bad_value("image_size", self.image_size,
                            f"a multiple of {self.downsample_factor} (2 ** (levels - 1))")

    @property
    def downsample_factor(self) -> int:
        """Total downsampling ``2 ** (len(channel_mult) - 1)``; H and W must be multiples."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> AlignmentConfig:
        """A named size (``tiny``, ``small``; see ``PRESETS``) with overrides.

        Example: ``AlignmentConfig.preset("tiny", image_size=8)``.
        """
        return preset_config(cls, PRESETS, name, overrides, scale_attention=False)


class AlignmentModel(EncoderTrunk):
    """Noise-aware image tower + text projection into one unit sphere (SDG Sec. 4; CLIP).

    Image tower: the shared encoder (:class:`~difflab.networks.trunk.EncoderTrunk` without
    attention or middle block): ``conv_in``, then per level ``num_res_blocks`` time-conditioned
    :class:`ResBlock` s and (except after the last level) a BigGAN-style downsampling
    ResBlock (2x2 average pooling inside, as ADM's classifier with ``resblock_updown``), then
    global average pooling, LayerNorm, SiLU and a linear projection to ``embed_dim``. The norm
    comes after the pooling: a per-channel GroupNorm of a flat image (a solid colour) would be
    zero, so the mean colour, the plainest content there is, would be lost.
    ``image_features`` returns the output of every level (before its downsampling): the
    feature maps whose Gram matrices define SDG's style guidance (Sec. 3-4).

    Text tower: the frozen sentence embedding ``(B, text_dim)`` through a two-layer MLP.

    Both embeddings are L2-normalised; ``logit_scale`` is CLIP's learnable log-temperature.

    Args:
        config: the hyper-parameters.
    """

    def __init__(self, config: AlignmentConfig) -> None:
        super().__init__()
        self.config = c = config
        self.time_embed = TimeEmbedding(c.model_channels, 4 * c.model_channels)
        self.build_trunk(TrunkSpec(
            c.in_channels, c.model_channels, c.channel_mult, c.num_res_blocks, c.image_size,
            dropout=c.dropout, resblock_updown=True, middle=False))
        ch = self.trunk_channels
        self.feature_channels = tuple(c.model_channels * m for m in c.channel_mult)
        self.out_norm = nn.LayerNorm(ch)
        self.image_proj = nn.Linear(ch, c.embed_dim)
        self.text_proj = nn.Sequential(
            nn.Linear(c.text_dim, 2 * c.embed_dim),
            nn.GELU(),
            nn.Linear(2 * c.embed_dim, c.embed_dim),
        )
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special initialisation, in one place.

        PyTorch's default init, then zero-init of the last conv of every :class:`ResBlock`, so
        each block starts as the identity (DDPM App. B / ADM ``zero_module``). The projections
        keep their default init: a zero projection would have no direction to normalise.
        """
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
                nn.init.zeros_(m.conv2.bias)

    @property
    def scale(self) -> Tensor:
        """The logit multiplier ``exp(logit_scale)``, clamped at 100 (CLIP Sec. 2.5)."""
        return self.logit_scale.exp().clamp(max=LOGIT_SCALE_MAX)

    # ----- image tower -------------------------------------------------------------------------
    def _tower(self, x: Tensor, t: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the image tower: the final map and the per-level feature maps."""
        t = self._check_inputs(x, t)
        emb = F.silu(self.time_embed(t))  # (B, 4 ch), the SiLU opening every ResBlock
        h, outputs = self.run_trunk(x, emb)  # (B, ch, H / f, W / f), every block's output
        return h, [outputs[i] for i in self.level_ends]  # per level, before its downsampling

    def image_features(self, x_t: Tensor, t: Tensor) -> list[Tensor]:
        """Intermediate feature maps ``[(B, C_l, H_l, W_l)]``, one per level, shallowest first.

        Args:
            x_t: noisy images ``(B, in_channels, H, W)``.
            t: the network's time signal ``(B,)`` or a scalar.
        """
        return self._tower(x_t, t)[1]

    def image_embed(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The unit image embedding ``E_I'(x_t, t)`` ``(B, embed_dim)`` (SDG Sec. 3-4).

        Args:
            x_t: noisy images ``(B, in_channels, H, W)``.
            t: the network's time signal ``(B,)`` or a scalar.
        """
        h, _ = self._tower(x_t, t)
        h = h.mean(dim=(2, 3))  # (B, ch), global average pooling
        h = silu_(self.out_norm(h))  # (B, ch), normalised across channels after pooling
        return F.normalize(self.image_proj(h), dim=-1)  # (B, E)

    # ----- text tower --------------------------------------------------------------------------
    def text_embed(self, text: Tensor) -> Tensor:
        """The unit text embedding ``E_L(l)`` ``(B, embed_dim)`` of frozen sentence vectors.

        Args:
            text: precomputed sentence embeddings ``(B, text_dim)``.
        """
        d = self.config.text_dim
        if not isinstance(text, Tensor) or text.ndim != 2 or text.shape[1] != d:
            got = tuple(text.shape) if isinstance(text, Tensor) else type(text).__name__
            raise DifflabError(
                f"AlignmentModel: expected text embeddings of shape (B, {d}) (text_dim={d}), "
                f"got {got}"
            )
        weight = self.text_proj[0].weight
        text = text.to(dtype=weight.dtype, device=weight.device)
        return F.normalize(self.text_proj(text), dim=-1)  # (B, E)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """``image_embed(x, t)``: the signature :class:`~difflab.networks.noisy.NoisyModel`
        calls (``t`` is the network time signal; ``cond`` is ignored)."""
        return self.image_embed(x, t)

    def _check_inputs(self, x: Tensor, t: Tensor) -> Tensor:
        c = self.config
        return check_image_and_time("AlignmentModel", x, t, c.in_channels,
                                    c.downsample_factor, x_name="x_t")


# Size presets. ``tiny`` is for tests and toy problems, ``small`` for CPU training on the emoji
# captions at 32 px.
PRESETS: dict[str, AlignmentConfig] = {
    "tiny": AlignmentConfig(
        image_size=16,
        embed_dim=64,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
    ),
    "small": AlignmentConfig(
        image_size=32,
        embed_dim=256,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
    ),
}


# ----- the registry entry ------------------------------------------------------------------------
def _from_data(d: DataSpec) -> dict[str, Any]:
    return {k: v for k, v in (("image_size", d.image_size), ("in_channels", d.channels),
                              ("text_dim", d.text_dim)) if v is not None}


_LEVELS = re.compile(r"^levels\.(\d+)\.(\d+)\.(.*)$")
_DOWNS = re.compile(r"^downs\.(\d+)\.(.*)$")


def _upgrade_weights(tensors: dict, config: AlignmentConfig, version: int) -> dict:
    """Layout 1 kept the tower as ``levels.L.J`` (residual blocks) and ``downs.L``; layout 2
    builds it from the shared trunk, one ``down`` list of ``num_res_blocks + 1`` blocks per
    level (the same modules, in the same order)."""
    step = config.num_res_blocks + 1
    out = {}
    for key, value in tensors.items():
        if m := _LEVELS.match(key):
            key = f"down.{int(m[1]) * step + int(m[2])}.0.{m[3]}"
        elif m := _DOWNS.match(key):
            key = f"down.{int(m[1]) * step + config.num_res_blocks}.0.{m[2]}"
        out[key] = value
    return out


FAMILY = register_family(Family(
    name="alignment", config=AlignmentConfig, build=AlignmentModel, kind="alignment",
    presets=PRESETS, default_preset="small", resolve=_from_data, version=2,
    upgrade_weights=_upgrade_weights, scale_attention=False,
    input_shape=image_shape,
    doc="a noise-aware image-text alignment model (SDG's guide, CLIP-style)"))
