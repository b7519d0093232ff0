"""Building blocks of the diffusion U-Nets, in any number of spatial dimensions.

Time embedding (DDPM, Ho et al. 2020, sec. 4 and App. B), residual blocks with adaptive group
norm (ADM, Dhariwal & Nichol 2021, sec. 3), BigGAN-style resampling inside residual blocks
(ADM sec. 3, after Brock et al. 2019) and plain resampling layers. The attention blocks live in
:mod:`difflab.networks.attention`, the shared encoder in :mod:`difflab.networks.trunk`.

Every convolution, resampling and residual block takes ``dims`` (1, 2 or 3), as ADM's
``conv_nd`` does: ``dims=1`` for sequences ``(B, C, L)``, 2 for images ``(B, C, H, W)``, 3 for
videos ``(B, C, T, H, W)`` (resampled in ``H, W`` only, frames kept). A block receives the time
embedding only when it reads it (:class:`TimestepBlock`, ADM's idea) and the text context only
when it reads it (:class:`ContextBlock`); :class:`EmbedSequential` decides once, when it is
built, which arguments each of its blocks gets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ContextBlock",
    "Downsample",
    "EmbedSequential",
    "ResBlock",
    "TimeEmbedding",
    "TimestepBlock",
    "Upsample",
    "avg_pool_nd",
    "check_context",
    "check_labels",
    "conv_nd",
    "group_norm",
    "silu_",
    "timestep_embedding",
]

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _check_dims(dims: int) -> int:
    if dims not in _CONV:
        raise ValueError(f"dims={dims!r} is not valid: expected 1, 2 or 3 spatial dimensions")
    return dims


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d`` / ``Conv2d`` / ``Conv3d`` for ``dims`` = 1 / 2 / 3 (ADM ``conv_nd``)."""
    return _CONV[_check_dims(dims)](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """``nn.AvgPool1d`` / ``AvgPool2d`` / ``AvgPool3d`` for ``dims`` = 1 / 2 / 3."""
    return _POOL[_check_dims(dims)](*args, **kwargs)


def resample_factor(dims: int) -> int | tuple[int, ...]:
    """The 2x resampling of ``dims`` spatial dimensions: every one, except the frames of a
    video (``dims=3``: ``(1, 2, 2)``, as ADM)."""
    return (1, 2, 2) if dims == 3 else 2


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0,
                       freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of a real-valued time signal.

    The Transformer position encoding (Vaswani et al. 2017, sec. 3.5) used for the
    diffusion step by DDPM (Ho et al. 2020, App. B). With ``half = dim // 2`` and
    frequencies ``w_i = max_period ** (-i / half)`` for ``i = 0 .. half - 1``::

        emb(t) = [cos(t w_0), ..., cos(t w_{half-1}), sin(t w_0), ..., sin(t w_{half-1})]

    (cosines first, as in ADM). ``t`` may be fractional (continuous-time models feed
    ``1000 t`` or ``log(sigma) / 4``). An odd ``dim`` gets one trailing zero. ``freq_shift``
    divides the exponent by ``half - freq_shift`` instead (diffusers' ``downscale_freq_shift``;
    its DiT uses 1, where the DiT code and ADM use 0).

    Args:
        t: time signal of shape ``(B,)``; any real dtype, computed in float32.
        dim: embedding width.
        max_period: the longest period, ``2 pi max_period``.
        freq_shift: the frequencies are ``max_period ** (-i / (half - freq_shift))``.

    Returns:
        Float32 tensor of shape ``(B, dim)``.
    """
    half = dim // 2
    exponent = torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift)
    freqs = torch.exp(-math.log(max_period) * exponent)  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP (DDPM App. B; ADM ``time_embed``).

    Args:
        freq_dim: width of the sinusoidal features (the U-Net's ``model_channels``).
        emb_dim: output width (``4 * model_channels`` in DDPM / ADM).
        freq_shift: see :func:`timestep_embedding` (0 but for diffusers' DiT layout).
    """

    def __init__(self, freq_dim: int, emb_dim: int, freq_shift: float = 0.0) -> None:
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.linear_1 = nn.Linear(freq_dim, emb_dim)
        self.linear_2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t: Tensor) -> Tensor:
        """Map ``t`` of shape ``(B,)`` to an embedding ``(B, emb_dim)`` in the weights' dtype
        (the sinusoids are computed in float32, then cast)."""
        freqs = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
        freqs = freqs.to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(freqs)))


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in DDPM / ADM (``gcd(channels, groups)`` if that fails).

    Args:
        channels: number of channels normalised.
        groups: the wanted number of groups.
        eps: added to the variance.
    """
    return nn.GroupNorm(math.gcd(channels, groups), channels, eps=eps)


def silu_(h: Tensor) -> Tensor:
    """SiLU of a freshly computed tensor, in place when autograd is off (sampling).

    Saves one activation-sized buffer per call; with autograd on it is out of place,
    since SiLU's backward needs its input.
    """
    return F.silu(h, inplace=not torch.is_grad_enabled())


class TimestepBlock(nn.Module):
    """A block that reads the time embedding: ``block(x, emb)`` (ADM's ``TimestepBlock``)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class ContextBlock(nn.Module):
    """A block that reads the text context: ``block(x, context, context_mask)``."""

    def forward(self, x: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (DDPM App. B).

    Args:
        channels: input channels.
        use_conv: apply a 3x3 convolution after upsampling.
        out_channels: output channels (default ``channels``; needs ``use_conv``).
        dims: spatial dimensions (a video, ``dims=3``, keeps its frame count).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None,
                 dims: int = 2) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample: changing the channel count needs use_conv=True")
        self.dims = _check_dims(dims)
        self.conv = conv_nd(dims, channels, out_channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S) -> (B, C_out, *2S)`` (a video: ``(B, C_out, T, 2H, 2W)``)."""
        if self.dims == 3:
            T, H, W = x.shape[2:]
            x = F.interpolate(x, size=(T, 2 * H, 2 * W), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv, or 2x average pooling (DDPM App. B).

    Args:
        channels: input channels.
        use_conv: strided convolution (True) or average pooling (False).
        out_channels: output channels (default ``channels``; needs ``use_conv``).
        dims: spatial dimensions (a video, ``dims=3``, keeps its frame count).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None,
                 dims: int = 2) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Downsample: changing the channel count needs use_conv=True")
        stride = resample_factor(_check_dims(dims))
        self.op: nn.Module = (
            conv_nd(dims, channels, out_channels, 3, stride=stride, padding=1)
            if use_conv
            else avg_pool_nd(dims, kernel_size=stride, stride=stride)
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S) -> (B, C_out, *S/2)``."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the time (and class) embedding.

    DDPM's Wide-ResNet block (Ho et al. 2020, App. B) with ADM's adaptive group norm
    (Dhariwal & Nichol 2021, sec. 3)::

        h = conv1(SiLU(GN(x)))
        h = GN(h) * (1 + scale) + shift          with (scale, shift) = Linear(SiLU(emb))
        out = skip(x) + conv2(dropout(SiLU(h)))

    Without scale-shift the projection is added before the norm: ``GN(h + Linear(SiLU(emb)))``.
    With ``up`` / ``down`` the block also resamples both paths, after the first
    norm, as BigGAN does (ADM sec. 3, "BigGAN residual blocks for up/downsampling").
    ``conv2`` is zero-initialised by the model so the block starts as the identity.

    Args:
        in_channels: input channels.
        emb_dim: width of the embedding.
        out_channels: output channels (default ``in_channels``).
        dropout: dropout probability before ``conv2``.
        use_scale_shift_norm: ADM's adaptive group norm (True) or additive embedding.
        up: upsample 2x inside the block.
        down: downsample 2x inside the block.
        dims: spatial dimensions of the features (1, 2 or 3).
    """

    def __init__(
        self,
        in_channels: int,
        emb_dim: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        dims: int = 2,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be True")
        out_channels = out_channels or in_channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.dims = _check_dims(dims)
        self.norm1 = group_norm(in_channels)
        self.resample: nn.Module | None = None
        if up:
            self.resample = Upsample(in_channels, use_conv=False, dims=dims)
        elif down:
            self.resample = Downsample(in_channels, use_conv=False, dims=dims)
        self.conv1 = conv_nd(dims, in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(
            emb_dim, 2 * out_channels if use_scale_shift_norm else out_channels
        )
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv_nd(dims, out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else conv_nd(dims, in_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: features ``(B, C_in, *S)``.
            emb: the *activated* embedding ``SiLU(emb)`` of shape ``(B, emb_dim)``; the
                U-Net applies the SiLU once for all blocks (ADM's ``emb_layers`` start with it).

        Returns:
            ``(B, C_out, *S')`` with ``S' = 2S``, ``S/2`` or ``S`` for up / down / neither.
        """
        h = silu_(self.norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        e = self.emb_proj(emb)
        e = e.reshape(*e.shape, *(1,) * self.dims)  # (B, C', 1, ...): broadcast over S
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1.0 + scale)  # ADM sec. 3: AdaGN
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(silu_(h)))
        return h.add_(self.skip(x))  # conv's backward does not need its output: add in place


_PLAIN, _TIME, _CONTEXT = 0, 1, 2


class EmbedSequential(nn.ModuleList):
    """Blocks applied in order; each gets the time embedding only if it is a
    :class:`TimestepBlock`, the context only if it is a :class:`ContextBlock`.

    Which block takes what is decided once, here, not on every call.
    """

    def __init__(self, blocks=None) -> None:
        super().__init__(blocks)
        self._kinds = tuple(_TIME if isinstance(b, TimestepBlock) else
                            _CONTEXT if isinstance(b, ContextBlock) else _PLAIN for b in self)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        """Thread ``x`` through every block with the conditioning each one reads."""
        for block, kind in zip(self, self._kinds):
            if kind == _TIME:
                x = block(x, emb)
            elif kind == _CONTEXT:
                x = block(x, context, context_mask)
            else:
                x = block(x)
        return x


# ----- shared by every network family built from these blocks -----------------------------------
def preset_config(cls: type, presets: dict, name: str, overrides: dict,
                  scale_attention: bool = True):
    """``presets[name]`` with ``overrides`` (unknown fields rejected). With
    ``scale_attention``, overriding ``image_size`` alone keeps attention at the same levels
    (``small`` at 28 px attends at 14x14 where it attends at 16x16 for 32 px)."""
    import dataclasses

    from difflab.errors import DifflabError, bad_value

    if name not in presets:
        raise bad_value("preset", name, f"one of {sorted(presets)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DifflabError(f"{cls.__name__}.preset: unknown field(s) {unknown}; the fields are "
                           f"{sorted(known)}")
    base = presets[name]
    overrides = dict(overrides)
    size = overrides.get("image_size", base.image_size)
    if (scale_attention and "attention_resolutions" not in overrides
            and size % base.downsample_factor == 0):
        factors = [base.image_size // r for r in base.attention_resolutions]
        overrides["attention_resolutions"] = tuple(size // f for f in factors)
    return dataclasses.replace(base, **overrides)


def check_image_and_time(owner: str, x: Tensor, t: Tensor, in_channels: int, factor: int,
                         x_name: str = "x", dims: int = 2) -> Tensor:
    """Check ``x (B, in_channels, *S)`` with ``dims`` spatial sizes, those that are resampled
    multiples of the downsampling ``factor``; returns ``t`` as a ``(B,)`` tensor (a scalar is
    broadcast)."""
    from difflab.errors import DifflabError

    layout = {1: "L", 2: "H, W", 3: "T, H, W"}[dims]
    if not isinstance(x, Tensor) or x.ndim != 2 + dims or x.shape[1] != in_channels:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DifflabError(f"{owner}: expected {x_name} of shape (B, {in_channels}, {layout}) "
                           f"(in_channels={in_channels}), got {got}")
    B = x.shape[0]
    sizes = x.shape[-2:] if dims == 3 else x.shape[2:]
    if any(s % factor for s in sizes):
        shown = "x".join(str(s) for s in sizes)
        raise DifflabError(f"{owner}: size {shown} is not divisible by the downsampling "
                           f"factor {factor} (2 ** (len(channel_mult) - 1)); pad or resize to a "
                           f"multiple of {factor}")
    t = torch.as_tensor(t, device=x.device)
    t = t.expand(B) if t.ndim == 0 else t
    if t.shape != (B,):
        raise DifflabError(f"{owner}: expected t of shape ({B},) or a scalar, got "
                           f"{tuple(t.shape)}")
    return t


def check_labels(owner: str, labels: Tensor | None, num_classes: int | None, B: int,
                 device: torch.device) -> Tensor | None:
    """``cond.labels`` checked for a network with ``num_classes`` classes (None: unconditional,
    which takes no labels); absent labels are the null class ``num_classes``."""
    from difflab.errors import DifflabError

    n = num_classes
    if n is None:
        if labels is not None:
            raise DifflabError(f"{owner}: cond.labels given to an unconditional model "
                               "(num_classes=None); build it with num_classes set or drop the "
                               "labels")
        return None
    if labels is None:
        return torch.full((B,), n, dtype=torch.long, device=device)  # the null class
    if labels.shape != (B,) or labels.dtype.is_floating_point or labels.is_complex():
        raise DifflabError(f"{owner}: expected integer cond.labels of shape ({B},), got "
                           f"{labels.dtype} {tuple(labels.shape)}")
    if B and (int(labels.min()) < 0 or int(labels.max()) > n):
        raise DifflabError(f"{owner}: cond.labels must lie in [0, {n}] ({n} = the null class), "
                           f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.long()


def check_context(owner: str, context: Tensor | None, mask: Tensor | None,
                  context_dim: int | None, B: int, dtype: torch.dtype
                  ) -> tuple[Tensor | None, Tensor | None]:
    """``cond.context (B, L, context_dim)`` and ``cond.context_mask (B, L)`` checked for a
    network with cross-attention of width ``context_dim`` (None: no text), the context cast to
    the network's ``dtype`` (float32 text-encoder tokens meet a half-precision model)."""
    from difflab.errors import DifflabError

    d = context_dim
    if d is None:
        if context is not None or mask is not None:
            raise DifflabError(f"{owner}: cond.context / cond.context_mask given but the model "
                               "has no text cross-attention (context_dim=None): build it with "
                               "context_dim set (the text encoder's width) or drop the text")
        return None, None
    if context is None or context.ndim != 3 or context.shape[0] != B or context.shape[2] != d:
        got = None if context is None else tuple(context.shape)
        raise DifflabError(f"{owner}: expected cond.context of shape ({B}, L, {d}) "
                           f"(context_dim={d}), got {got}")
    if mask is not None:
        if mask.shape != context.shape[:2]:
            raise DifflabError(f"{owner}: expected cond.context_mask of shape "
                               f"{tuple(context.shape[:2])}, got {tuple(mask.shape)}")
        mask = mask.bool()
    return context.to(dtype), mask
