"""The ADM / LDM U-Net.

The DDPM U-Net (Ho et al. 2020, App. B: a PixelCNN++-style U-Net of Wide-ResNet blocks
with self-attention at 16x16), with the improvements of improved DDPM (Nichol & Dhariwal
2021: learned variance output, sec. 3.1) and ADM (Dhariwal & Nichol 2021, sec. 3: several
attention heads, BigGAN up/down residual blocks, adaptive group norm, class embedding),
and the cross-attention transformer blocks of latent diffusion (Rombach et al. 2022,
sec. 3.3) for text / token conditioning.

The file reads top to bottom: the configuration, the model, then its size presets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.components import DataSpec, Family, image_shape, register_family
from difflab.cond import Cond, Control
from difflab.errors import DifflabError, bad_value
from difflab.networks.attention import AttentionBlock, SpatialTransformer
from difflab.networks.layers import (
    EmbedSequential,
    ResBlock,
    TimeEmbedding,
    Upsample,
    check_image_and_time,
    conv_nd,
    group_norm,
    preset_config,
    silu_,
)
from difflab.networks.trunk import EncoderTrunk, TrunkSpec

__all__ = ["UNet", "UNetConfig"]


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (names follow ADM's ``create_model``).

    Attributes:
        image_size: the training resolution; fixes where attention goes (inputs of other
            sizes divisible by ``downsample_factor`` are accepted).
        in_channels: channels of ``x``.
        out_channels: channels predicted (doubled when ``learn_sigma``).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: width multiplier per resolution level (one level per entry).
        num_res_blocks: residual blocks per level in the encoder (decoder: one more).
        attention_resolutions: feature-map sizes (e.g. ``(16,)``) that get attention.
        num_heads: attention heads (used when ``num_head_channels == -1``).
        num_head_channels: fixed width per head instead of a fixed head count (-1: off).
        dropout: dropout in the residual blocks (and transformer feed-forwards).
        num_classes: class-conditional with this many classes (None: unconditional).
            The embedding has ``num_classes + 1`` rows; id ``num_classes`` is the null
            class used for classifier-free guidance.
        context_dim: width of ``cond.context`` tokens; when set, every attention layer is
            a :class:`SpatialTransformer` with cross-attention (None: no cross-attention).
        transformer_depth: transformer blocks per :class:`SpatialTransformer`.
        concat_channels: channels of ``cond.concat`` joined to ``x`` (Palette, inpainting).
        learn_sigma: also output iDDPM's variance interpolation ``v`` (eq. 15).
        resblock_updown: resample with BigGAN residual blocks (ADM) instead of conv layers.
        use_scale_shift_norm: ADM's adaptive group norm (else the embedding is added).
        dims: spatial dimensions: 2 for images ``(B, C, H, W)``, 1 for sequences
            ``(B, C, L)``, 3 for videos ``(B, C, T, H, W)`` (resampled in H, W only;
            attention over all positions).
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 4
    num_head_channels: int = -1
    dropout: float = 0.0
    num_classes: int | None = None
    context_dim: int | None = None
    transformer_depth: int = 1
    concat_channels: int = 0
    learn_sigma: bool = False
    resblock_updown: bool = False
    use_scale_shift_norm: bool = True
    dims: int = 2

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise bad_value("channel_mult", self.channel_mult, "a non-empty tuple of ints >= 1")
        for name in ("image_size", "in_channels", "out_channels", "model_channels"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a positive int")
        if self.num_res_blocks < 1 or self.transformer_depth < 1:
            raise bad_value(
                "num_res_blocks/transformer_depth",
                (self.num_res_blocks, self.transformer_depth),
                "ints >= 1",
            )
        if self.image_size % self.downsample_factor:
            raise bad_value(
                "image_size", self.image_size, f"a multiple of {self.downsample_factor}"
            )
        sizes = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        if any(r not in sizes for r in self.attention_resolutions):
            raise bad_value(
                "attention_resolutions", self.attention_resolutions, f"sizes among {sizes}"
            )
        if self.num_classes is not None and self.num_classes < 1:
            raise bad_value("num_classes", self.num_classes, "None or an int >= 1")
        if self.context_dim is not None and self.context_dim < 1:
            raise bad_value("context_dim", self.context_dim, "None or an int >= 1")
        if self.concat_channels < 0:
            raise bad_value("concat_channels", self.concat_channels, "an int >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad_value("dropout", self.dropout, "a probability in [0, 1)")
        if self.dims not in (1, 2, 3):
            raise bad_value("dims", self.dims, "1, 2 or 3 spatial dimensions")
        for mult in self.channel_mult:
            self.heads(self.model_channels * mult)  # raises when heads do not divide

    @property
    def downsample_factor(self) -> int:
        """Total downsampling ``2 ** (len(channel_mult) - 1)``; H and W must be multiples."""
        return 2 ** (len(self.channel_mult) - 1)

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
    def preset(cls, name: str, **overrides: Any) -> UNetConfig:
        """A named size (``tiny``, ``small``, ``base``; see ``PRESETS``) with overrides.

        Overriding ``image_size`` alone keeps attention at the same levels (e.g. ``small``
        at 28 px attends at 14x14 where it attends at 16x16 for 32 px).

        Example: ``UNetConfig.preset("small", image_size=28, in_channels=1, num_classes=10)``.
        """
        return preset_config(cls, PRESETS, name, overrides)


class UNet(EncoderTrunk):
    """The ADM / LDM U-Net: ``net(x, t, cond) -> output``.

    Encoder: ``conv_in`` then, per level, ``num_res_blocks`` residual blocks (each
    followed by attention at the chosen resolutions) and a 2x downsampling (not after
    the last level). Middle: residual block, attention, residual block. Decoder: per level
    ``num_res_blocks + 1`` residual blocks, each taking one encoder feature concatenated
    along channels (the skip connections), then a 2x upsampling. Output:
    GroupNorm, SiLU, 3x3 conv.

    Skip features are, in order: the output of ``conv_in``, then the output of every
    encoder block (residual block + attention, or downsampling), shallowest first; there
    are ``num_skips = 1 + len(channel_mult) * (num_res_blocks + 1) - 1`` of them.
    ``cond.control`` (ControlNet, Zhang et al. 2023 sec. 3.2) holds control branches
    (:class:`~difflab.cond.Control`), run at every call from ``(x, t, hint, cond)``; each
    returns ``num_skips + 1`` residuals: ``r[i]`` is added (times its scale) to skip ``i``
    before it is concatenated in the decoder, and ``r[-1]`` to the middle block's output.

    Args:
        config: the hyper-parameters.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        ch = c.model_channels
        emb_dim = 4 * ch
        self.time_embed = TimeEmbedding(ch, emb_dim)
        self.label_emb = None if c.num_classes is None else nn.Embedding(c.num_classes + 1, emb_dim)
        self.build_trunk(TrunkSpec(
            c.in_channels + c.concat_channels, ch, c.channel_mult, c.num_res_blocks,
            c.image_size, c.attention_resolutions, c.dropout, c.use_scale_shift_norm,
            c.resblock_updown, middle=True, dims=c.dims), self._attention)
        self.num_skips = len(self.skip_channels)

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb_dim, cout, c.dropout, c.use_scale_shift_norm, dims=c.dims,
                            **kw)

        skip_channels, ch, size = list(self.skip_channels), self.trunk_channels, self.trunk_size
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if size in c.attention_resolutions:
                    blocks.append(self._attention(ch))
                if level > 0 and i == c.num_res_blocks:
                    blocks.append(res(ch, ch, up=True) if c.resblock_updown
                                  else Upsample(ch, dims=c.dims))
                    size *= 2
                self.up.append(EmbedSequential(blocks))
        self.out_norm = group_norm(ch)
        out_channels = c.out_channels * (2 if c.learn_sigma else 1)
        self.out_conv = conv_nd(c.dims, ch, out_channels, 3, padding=1)
        self.initialize_weights()

    def _attention(self, channels: int) -> nn.Module:
        heads, head_dim = self.config.heads(channels)
        if self.config.context_dim is None:
            return AttentionBlock(channels, heads, head_dim)
        return SpatialTransformer(
            channels,
            heads,
            head_dim,
            self.config.transformer_depth,
            self.config.context_dim,
            self.config.dropout,
        )

    def initialize_weights(self) -> None:
        """All special initialisation, in one place.

        PyTorch's default init everywhere (as ADM), then zero-init of every layer that
        closes a residual branch, so each block starts as the identity and the initial
        output is exactly zero (DDPM App. B / ADM ``zero_module``; LDM ``proj_out``):
        the last conv of each :class:`ResBlock`, the output projection of each
        :class:`AttentionBlock` and :class:`SpatialTransformer`, and the output conv.
        """
        zero: list[nn.Module] = [self.out_conv]
        for m in self.modules():
            if isinstance(m, ResBlock):
                zero.append(m.conv2)
            elif isinstance(m, AttentionBlock):
                zero.append(m.attn.to_out)
            elif isinstance(m, SpatialTransformer):
                zero.append(m.proj_out)
        for m in zero:
            for p in m.parameters():
                nn.init.zeros_(p)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """Predict from a noisy input.

        Args:
            x: noisy input ``(B, in_channels, H, W)``; H, W multiples of ``downsample_factor``.
            t: time signal ``(B,)`` (or a scalar), already mapped (e.g. ``1000 t``); may be
                fractional.
            cond: optional conditioning: ``labels (B,)`` int64 in ``[0, num_classes]``
                (absent = the null class), ``context (B, L, context_dim)`` and
                ``context_mask (B, L)`` (True = real token), ``concat (B, concat_channels,
                H, W)``, ``control`` (``num_skips + 1`` residuals, see the class docstring).

        Returns:
            ``(B, out_channels, H, W)``, or ``(B, 2 * out_channels, H, W)`` with
            ``learn_sigma``: the mean parameterization, then iDDPM's ``v`` (eq. 15).
        """
        t, labels, context, mask, concat, control = self._check_inputs(x, t, cond)
        if concat is not None:
            x = torch.cat([x, concat], dim=1)  # (B, C + C', H, W)
        emb = self.time_embed(t)  # (B, E)
        if self.label_emb is not None:
            emb = emb + self.label_emb(labels)  # (B, E)
        emb = F.silu(emb)  # (B, E), the SiLU that opens every ResBlock's projection
        h, skips = self.run_trunk(x, emb, context, mask)  # (B, ch_mid, H / f, W / f), skips
        if control:
            inner = replace(cond, control=None)
            for c in control:  # ControlNet residuals of this x_t, added to skips and middle
                skips, h = _add_control(skips, h, c.branch(x, t, c.hint, inner), c.scale)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, mask)  # (B, ch_i, ...)
        return self.out_conv(silu_(self.out_norm(h)))  # (B, C_out, H, W)

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Cond | None) -> tuple[Any, ...]:
        """Validate; returns ``(t, labels, context, context_mask, concat, control)``."""
        c, cond = self.config, cond if cond is not None else Cond()
        t = check_image_and_time("UNet", x, t, c.in_channels, c.downsample_factor, dims=c.dims)
        B, S = x.shape[0], tuple(x.shape[2:])
        labels = self._check_labels(cond.labels, B, x.device)
        context, mask = self._check_context(cond.context, cond.context_mask, B)
        if c.concat_channels:
            want = (B, c.concat_channels, *S)
            if cond.concat is None or tuple(cond.concat.shape) != want:
                got = None if cond.concat is None else tuple(cond.concat.shape)
                raise DifflabError(f"UNet: expected cond.concat of shape {want}, got {got}")
        elif cond.concat is not None:
            raise DifflabError("UNet: cond.concat given but the model has concat_channels=0")
        if cond.control is not None:
            for c in cond.control:
                if not isinstance(c, Control) or c.hint.shape[0] != B:
                    got = type(c).__name__ if not isinstance(c, Control) else (
                        f"a hint of batch {c.hint.shape[0]}")
                    raise DifflabError(f"UNet: cond.control must hold difflab.Control branches "
                                       f"with hints of batch {B}, got {got}")
        return t, labels, context, mask, cond.concat, cond.control

    def _check_labels(self, labels: Tensor | None, B: int, device: torch.device) -> Tensor | None:
        n = self.config.num_classes
        if n is None:
            if labels is not None:
                raise DifflabError(
                    "UNet: cond.labels given to an unconditional model (num_classes=None); "
                    "build it with num_classes set or drop the labels"
                )
            return None
        if labels is None:
            return torch.full((B,), n, dtype=torch.long, device=device)  # the null class
        if labels.shape != (B,) or labels.dtype.is_floating_point or labels.is_complex():
            raise DifflabError(
                f"UNet: expected integer cond.labels of shape ({B},), "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if B and (int(labels.min()) < 0 or int(labels.max()) > n):
            raise DifflabError(
                f"UNet: cond.labels must lie in [0, {n}] ({n} = the null class), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        return labels.long()

    def _check_context(
        self, context: Tensor | None, mask: Tensor | None, B: int
    ) -> tuple[Tensor | None, Tensor | None]:
        d = self.config.context_dim
        if d is None:
            if context is not None or mask is not None:
                raise DifflabError(
                    "UNet: cond.context / cond.context_mask given but the model has no "
                    "cross-attention (context_dim=None)"
                )
            return None, None
        if context is None or context.ndim != 3 or context.shape[0] != B or context.shape[2] != d:
            got = None if context is None else tuple(context.shape)
            raise DifflabError(
                f"UNet: expected cond.context of shape ({B}, L, {d}) (context_dim={d}), got {got}"
            )
        if mask is not None:
            if mask.shape != context.shape[:2]:
                raise DifflabError(
                    f"UNet: expected cond.context_mask of shape {tuple(context.shape[:2])}, "
                    f"got {tuple(mask.shape)}"
                )
            mask = mask.bool()
        # float32 text-encoder tokens meet a half-precision model: use the model's dtype
        return context.to(self.conv_in.weight.dtype), mask


def _add_control(
    skips: list[Tensor], h: Tensor, residuals: list[Tensor], scale: float
) -> tuple[list[Tensor], Tensor]:
    """Add one branch's residuals: ``scale * r[i]`` to skip ``i``, ``scale * r[-1]`` to ``h``."""
    if len(residuals) != len(skips) + 1:
        raise DifflabError(
            f"UNet: expected {len(skips) + 1} control residuals ({len(skips)} skips + the "
            f"middle block), got {len(residuals)}"
        )
    for i, (feat, r) in enumerate(zip([*skips, h], residuals)):
        if r.shape != feat.shape:
            name = "the middle block" if i == len(skips) else f"skip {i}"
            raise DifflabError(
                f"UNet: control residual {i} must match {name}: expected shape "
                f"{tuple(feat.shape)}, got {tuple(r.shape)}"
            )
    return [s + scale * r for s, r in zip(skips, residuals)], h + scale * residuals[-1]


# Size presets. ``tiny`` is for tests, ``small`` for CPU training at 28-32 px, ``base``
# is the ADM / improved-DDPM CIFAR-10 model (Nichol & Dhariwal 2021, sec. 2.4 / App. A).
PRESETS: dict[str, UNetConfig] = {
    "tiny": UNetConfig(
        image_size=16,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_heads=2,
    ),
    "small": UNetConfig(
        image_size=32,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_head_channels=32,
    ),
    "base": UNetConfig(
        image_size=32,
        model_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        num_head_channels=64,
        dropout=0.1,
    ),
}


# ----- the registry entry ------------------------------------------------------------------------
def _reads(c: UNetConfig) -> frozenset[str]:
    fields = {"control"}
    fields |= {"labels"} if c.num_classes is not None else set()
    fields |= {"context", "context_mask"} if c.context_dim is not None else set()
    fields |= {"concat"} if c.concat_channels else set()
    return frozenset(fields)


def _from_data(d: DataSpec) -> dict[str, Any]:
    """Image size and channels from the data (output channels = input channels), classes and
    context width from the task (None when it does not condition on them)."""
    out: dict[str, Any] = {"num_classes": d.num_classes, "context_dim": d.context_dim}
    if d.image_size is not None:
        out["image_size"] = d.image_size
    if d.channels is not None:
        out["in_channels"] = out["out_channels"] = d.channels
    if d.concat_channels is not None:
        out["concat_channels"] = d.concat_channels
    return out


FAMILY = register_family(Family(
    name="unet", config=UNetConfig, build=UNet, kind="denoiser", presets=PRESETS,
    default_preset="small", conditioning=_reads, resolve=_from_data,
    input_shape=image_shape, learned_variance=lambda c: c.learn_sigma,
    doc="the ADM / LDM U-Net (DDPM, iDDPM, ADM, LDM): class, text, concat and control inputs"))
