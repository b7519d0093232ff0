"""The noise-aware classifier of classifier guidance.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and App. C
"classifier architecture") train a classifier ``p_phi(y | x_t, t)`` on noisy images from the
forward process and guide sampling with ``grad_{x_t} log p_phi(y | x_t, t)``. Its network is the
downsampling half of the ADM U-Net (the same time embedding, residual blocks with adaptive group
norm, attention at chosen resolutions and the middle block) followed by a pooling head: ADM's
attention pooling at the lowest resolution (8x8 on ImageNet; ``AttentionPool2d``, after CLIP's
ResNet head, Radford et al. 2021, Sec. 2.4) or a spatial mean, then a linear map to the logits.

The file reads top to bottom: the pooling block, the configuration, the model, its size presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.components import DataSpec, Family, image_shape, register_family
from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value
from difflab.networks.attention import Attention, AttentionBlock
from difflab.networks.layers import (
    ResBlock,
    TimeEmbedding,
    check_image_and_time,
    group_norm,
    preset_config,
    silu_,
)
from difflab.networks.trunk import EncoderTrunk, TrunkSpec

__all__ = ["AttentionPool2d", "ClassifierConfig", "NoisyClassifier", "POOLS"]

POOLS = ("attention", "mean")


class AttentionPool2d(nn.Module):
    """Attention pooling of a feature map to one vector (ADM's ``AttentionPool2d``).

    The spatial mean is prepended to the ``HW`` pixel tokens, a learned positional embedding
    ``P`` (``HW + 1`` rows) is added to all of them, and the mean token alone queries the whole
    sequence::

        s = [mean_i x_i; x_1; ...; x_HW] + P                       (HW + 1, C)
        out = W_o MultiHead(q = W_q s_0, k = W_k s, v = W_v s)     (C,)

    (Vaswani et al. 2017, eq. 1 per head). ADM runs full self-attention over the ``HW + 1``
    tokens and keeps token 0; only the query of token 0 reaches that output, so this is the same
    function. The attention is an :class:`~difflab.networks.attention.Attention` (cross-attention
    form: ``to_q`` for the query, ``to_kv`` for the sequence), so attention processors hook it.

    Args:
        channels: feature channels ``C`` (the token width and the output width).
        spatial_size: the side ``H = W`` of the feature map (fixes the positional embedding).
        heads: number of heads.
        head_dim: width of each head.
    """

    def __init__(self, channels: int, spatial_size: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.spatial_size = spatial_size
        # ADM: randn(C, HW + 1) / sqrt(C)
        self.pos_emb = nn.Parameter(torch.randn(spatial_size**2 + 1, channels) / channels**0.5)
        self.attn = Attention(channels, heads, head_dim, context_dim=channels, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C)``."""
        if x.shape[-2:] != (self.spatial_size, self.spatial_size):
            raise DifflabError(
                f"AttentionPool2d: expected a {self.spatial_size}x{self.spatial_size} feature "
                f"map (its positional embedding is fixed), got {x.shape[-2]}x{x.shape[-1]}"
            )
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        seq = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)  # (B, HW + 1, C)
        seq = seq + self.pos_emb.to(seq.dtype)  # (B, HW + 1, C)
        return self.attn(seq[:, :1], context=seq)[:, 0]  # (B, C): token 0's output


@dataclass
class ClassifierConfig:
    """Hyper-parameters of :class:`NoisyClassifier` (names follow ADM's ``create_classifier``).

    Attributes:
        image_size: the input resolution (fixed when ``pool="attention"``: the positional
            embedding is sized for ``image_size / downsample_factor``).
        in_channels: channels of ``x``.
        num_classes: number of classes (logits per sample), at least 2.
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level.
        attention_resolutions: feature-map sizes that get a self-attention block.
        num_heads: attention heads (used when ``num_head_channels == -1``), also for pooling.
        num_head_channels: fixed width per head instead of a fixed head count (-1: off).
        dropout: dropout in the residual blocks.
        use_scale_shift_norm: ADM's adaptive group norm (else the time embedding is added).
        resblock_updown: downsample with BigGAN residual blocks instead of strided convs.
        pool: ``"attention"`` (ADM's attention pooling) or ``"mean"`` (spatial average).
    """

    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    pool: str = "attention"

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise bad_value("channel_mult", self.channel_mult, "a non-empty tuple of ints >= 1")
        for name in ("image_size", "in_channels", "model_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a positive int")
        if self.num_classes < 2:
            raise bad_value("num_classes", self.num_classes, "an int >= 2")
        if self.image_size % self.downsample_factor:
            raise bad_value(
                "image_size", self.image_size,
                f"a multiple of {self.downsample_factor} (2 ** (len(channel_mult) - 1))",
            )
        sizes = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        if any(r not in sizes for r in self.attention_resolutions):
            raise bad_value(
                "attention_resolutions", self.attention_resolutions, f"sizes among {sizes}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise bad_value("dropout", self.dropout, "a number in [0, 1)")
        if self.pool not in POOLS:
            raise bad_value("pool", self.pool, "one of " + ", ".join(repr(p) for p in POOLS))
        for mult in self.channel_mult:
            self.heads(self.model_channels * mult)  # raises when heads do not divide

    @property
    def downsample_factor(self) -> int:
        """Total downsampling ``2 ** (len(channel_mult) - 1)``."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def feature_dim(self) -> int:
        """Width ``D`` of the pooled features: the channels of the last level."""
        return self.model_channels * self.channel_mult[-1]

    def heads(self, channels: int) -> tuple[int, int]:
        """``(heads, head_dim)`` for attention over ``channels`` features."""
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            heads = channels // max(self.num_head_channels, 1)
        if heads < 1 or channels % heads:
            raise bad_value(
                "num_heads/num_head_channels",
                (self.num_heads, self.num_head_channels),
                f"a head layout that divides {channels} channels",
            )
        return heads, channels // heads

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ClassifierConfig:
        """A named size (``tiny``, ``small``, ``base``; see ``PRESETS``) with overrides.

        Overriding ``image_size`` alone keeps attention at the same levels (``small`` at 28 px
        attends and pools at 7x7 where it does at 8x8 for 32 px).

        Example: ``ClassifierConfig.preset("small", image_size=28, in_channels=1)``.
        """
        return preset_config(cls, PRESETS, name, overrides)


class NoisyClassifier(EncoderTrunk):
    """ADM's noise-aware classifier: ``net(x_t, t, cond=None) -> logits (B, num_classes)``.

    The shared encoder (:class:`~difflab.networks.trunk.EncoderTrunk`: ``conv_in``; per level
    ``num_res_blocks`` residual blocks, each followed by attention at the chosen resolutions,
    and a 2x downsampling, not after the last level; the middle block: residual, attention,
    residual); GroupNorm, SiLU and the pooling to ``(B, D)``
    (:meth:`features`); a linear head to the logits. Wrap it in
    :class:`~difflab.networks.noisy.NoisyModel` so that ``t`` is given in path time.

    Args:
        config: the hyper-parameters.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = c = config
        self.time_embed = TimeEmbedding(c.model_channels, 4 * c.model_channels)
        self.build_trunk(TrunkSpec(
            c.in_channels, c.model_channels, c.channel_mult, c.num_res_blocks, c.image_size,
            c.attention_resolutions, c.dropout, c.use_scale_shift_norm, c.resblock_updown,
            middle=True), lambda ch: AttentionBlock(ch, *c.heads(ch)))
        ch, size = self.trunk_channels, self.trunk_size
        self.out_norm = group_norm(ch)
        self.pool = AttentionPool2d(ch, size, *c.heads(ch)) if c.pool == "attention" else None
        self.head = nn.Linear(ch, c.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special initialisation, in one place.

        PyTorch's default init everywhere (as ADM), then zero-init of the layers that close a
        residual branch (ADM ``zero_module``): the last conv of each :class:`ResBlock` and the
        output projection of each :class:`AttentionBlock`, so every block starts as the
        identity. The pooling and the head keep their default init (as ADM's ``c_proj``).
        """
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero = m.conv2
            elif isinstance(m, AttentionBlock):
                zero = m.attn.to_out
            else:
                continue
            for p in zero.parameters():
                nn.init.zeros_(p)

    def features(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """The pooled embedding ``(B, D)`` before the head (``D = config.feature_dim``).

        Args:
            x: noisy input ``(B, in_channels, H, W)``.
            t: the network's time signal ``(B,)`` or a scalar (as the U-Net takes it:
                ``path.time_input(t)``, e.g. the step index on discrete paths).
            cond: None or a :class:`Cond` without tensors: the classifier is unconditional.
        """
        t = self._check_inputs(x, t, cond)
        emb = F.silu(self.time_embed(t))  # (B, E), the SiLU opening every ResBlock projection
        h, _ = self.run_trunk(x, emb)  # (B, D, H / f, W / f): encoder and middle block
        h = silu_(self.out_norm(h))  # (B, D, H / f, W / f)
        if self.pool is None:
            return h.mean(dim=(2, 3))  # (B, D)
        return self.pool(h)  # (B, D)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """Logits ``(B, num_classes)`` of ``p(y | x_t, t)``; arguments as in :meth:`features`."""
        return self.head(self.features(x, t, cond))  # (B, num_classes)

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        c = self.config
        t = check_image_and_time("NoisyClassifier", x, t, c.in_channels, c.downsample_factor)
        H, W = x.shape[-2:]
        if c.pool == "attention" and (H, W) != (c.image_size, c.image_size):
            raise DifflabError(
                f"NoisyClassifier: attention pooling fixes the input size to "
                f"{c.image_size}x{c.image_size} (image_size), got {H}x{W}; resize the input, "
                "or use pool='mean' for other sizes"
            )
        if cond is not None:
            given = [f.name for f in dataclasses.fields(cond)
                     if f.name != "extra" and getattr(cond, f.name) is not None]
            if given:
                raise DifflabError(
                    f"NoisyClassifier: cond.{', cond.'.join(given)} given, but the classifier is "
                    "unconditional (it predicts the labels; it must not see them): pass "
                    "cond=None"
                )
        return t

    def num_parameters(self) -> int:
        """The number of parameters."""
        return sum(p.numel() for p in self.parameters())


# Size presets. ``tiny`` is for tests (8x8 inputs, pooled at 4x4), ``small`` for CPU training at
# 28-32 px (pooled at 7x7 / 8x8), ``base`` is ADM's 64x64 ImageNet classifier (App. C / their
# ``classifier_*`` defaults: width 128, depth 2, attention at 32, 16, 8, 64-channel heads,
# BigGAN down-blocks, scale-shift norm, attention pooling at 8x8).
PRESETS: dict[str, ClassifierConfig] = {
    "tiny": ClassifierConfig(
        image_size=8,
        in_channels=1,
        model_channels=4,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_heads=2,
    ),
    "small": ClassifierConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=32,
    ),
    "base": ClassifierConfig(
        image_size=64,
        num_classes=1000,
        model_channels=128,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        num_head_channels=64,
        resblock_updown=True,
    ),
}


def _from_data(d: DataSpec) -> dict[str, Any]:
    out = {k: v for k, v in (("image_size", d.image_size), ("in_channels", d.channels),
                             ("num_classes", d.num_classes)) if v is not None}
    return out


FAMILY = register_family(Family(
    name="classifier", config=ClassifierConfig, build=NoisyClassifier, kind="classifier",
    presets=PRESETS, default_preset="small", resolve=_from_data,
    input_shape=image_shape,
    doc="ADM's noise-aware classifier p(y | x_t, t) for classifier guidance"))
