"""The encoder trunk shared by every network that reads noisy images with ADM's blocks.

The downsampling half of the ADM U-Net (Dhariwal & Nichol 2021, sec. 3; DDPM App. B) is the
encoder of four networks: the U-Net itself (its skips feed the decoder), the noise-aware
classifier (ADM sec. 4, pooled to logits), the image-text alignment model (SDG, Liu et al.
2023: per-level features and a pooled embedding) and ControlNet (Zhang et al. 2023, sec. 3.2:
a trainable copy of the U-Net's encoder and middle block). It is written once, here:

    conv_in; per level: num_res_blocks x [ResBlock, attention at chosen sizes],
    then a 2x downsampling (not after the last level); the middle block
    [ResBlock, attention, ResBlock] (optional).

:class:`EncoderTrunk` is a base class, not a submodule: the networks that subclass it keep
``conv_in``, ``down`` and ``mid`` as their own attributes, so their parameter names (and the
checkpoints that hold them) are the same whichever network is built, and a ControlNet copies a
U-Net's encoder by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from difflab.networks.layers import Downsample, EmbedSequential, ResBlock, conv_nd

__all__ = ["EncoderTrunk", "TrunkSpec"]


@dataclass(frozen=True)
class TrunkSpec:
    """The shape of an encoder trunk (names as ADM's ``create_model``).

    Attributes:
        in_channels: channels entering ``conv_in`` (the image plus any concatenated channels).
        model_channels: base width; level ``i`` has ``model_channels * channel_mult[i]``.
        channel_mult: width multiplier per level.
        num_res_blocks: residual blocks per level.
        image_size: the training resolution (which levels get attention depends on it).
        attention_resolutions: feature-map sizes whose residual blocks are followed by
            attention.
        dropout: dropout in the residual blocks.
        use_scale_shift_norm: ADM's adaptive group norm.
        resblock_updown: downsample with BigGAN residual blocks instead of strided convs.
        middle: build the middle block.
        dims: spatial dimensions (1, 2 or 3).
    """

    in_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    image_size: int
    attention_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    middle: bool = True
    dims: int = 2

    @property
    def emb_dim(self) -> int:
        """Width of the time embedding the residual blocks read: ``4 * model_channels``."""
        return 4 * self.model_channels


class EncoderTrunk(nn.Module):
    """Base class of the networks built on the shared encoder (see the module docstring).

    A subclass calls :meth:`build_trunk` in its ``__init__`` (after any module that must be
    created first, so initial weights follow the construction order) and :meth:`run_trunk` in
    its ``forward``. After building, ``skip_channels`` holds the channels of every encoder
    output (``conv_in`` first, then each block of ``down``), ``level_ends`` the index in that
    list of each level's last block before its downsampling, and ``trunk_channels`` /
    ``trunk_size`` the width and size where the trunk ends.
    """

    def build_trunk(self, spec: TrunkSpec,
                    attention: Callable[[int], nn.Module] | None = None) -> None:
        """Create ``conv_in``, ``down`` and (``spec.middle``) ``mid``.

        Args:
            spec: the trunk's shape.
            attention: ``attention(channels) -> block`` for the attention layers (ADM's
                self-attention or LDM's cross-attention transformer); None: no attention.
        """
        s = spec
        ch, emb = s.model_channels, s.emb_dim
        if s.attention_resolutions and attention is None:
            raise ValueError("build_trunk: attention_resolutions given without an attention "
                             "block factory")

        def res(cin: int, cout: int, **kw: bool) -> ResBlock:
            return ResBlock(cin, emb, cout, s.dropout, s.use_scale_shift_norm, dims=s.dims, **kw)

        self.conv_in = conv_nd(s.dims, s.in_channels, ch, 3, padding=1)
        skips, ends, size = [ch], [], s.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(s.channel_mult):
            for _ in range(s.num_res_blocks):
                blocks: list[nn.Module] = [res(ch, s.model_channels * mult)]
                ch = s.model_channels * mult
                if size in s.attention_resolutions:
                    blocks.append(attention(ch))
                self.down.append(EmbedSequential(blocks))
                skips.append(ch)
            ends.append(len(skips) - 1)
            if level < len(s.channel_mult) - 1:
                down = (res(ch, ch, down=True) if s.resblock_updown
                        else Downsample(ch, dims=s.dims))
                self.down.append(EmbedSequential([down]))
                skips.append(ch)
                size //= 2
        self.mid = None
        if s.middle:
            blocks = [res(ch, ch)]  # in order: construction order fixes the initial weights
            if attention is not None:
                blocks.append(attention(ch))
            blocks.append(res(ch, ch))
            self.mid = EmbedSequential(blocks)
        self.trunk_spec = s
        self.skip_channels = tuple(skips)
        self.level_ends = tuple(ends)
        self.trunk_channels, self.trunk_size = ch, size

    def run_trunk(self, x: Tensor, emb: Tensor, context: Tensor | None = None,
                  context_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder: ``(h, outputs)`` where ``outputs`` are ``conv_in``'s output and each
        ``down`` block's (the U-Net's skips, shallowest first) and ``h`` is the last of them
        passed through the middle block (when there is one).

        Args:
            x: input ``(B, in_channels, *S)``.
            emb: the activated time embedding ``SiLU(emb)`` ``(B, emb_dim)``.
            context, context_mask: cross-attention tokens, for the blocks that read them.
        """
        h = self.conv_in(x)  # (B, ch, *S)
        outputs = [h]
        for block in self.down:
            h = block(h, emb, context, context_mask)  # (B, ch_i, *S / 2^k)
            outputs.append(h)
        if self.mid is not None:
            h = self.mid(h, emb, context, context_mask)  # (B, ch_mid, *S / f)
        return h, outputs
