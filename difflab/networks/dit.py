"""DiT, the Diffusion Transformer (Peebles & Xie 2023, ICCV): ``net(x, t, cond) -> output``.

A ViT over the patches of an image (or of a latent): patchify with a stride-``p`` convolution and
add fixed 2-D sine-cosine positions (Sec. 3.2 "Patchify"), run ``depth`` transformer blocks
conditioned on the time step and the class, then the final layer norm and a linear decoder to
``p x p x C_out`` per token, rearranged back into the image (Sec. 3.2 "Transformer decoder").

The four block designs of the paper's ablation (Sec. 3.2 "DiT block design", Fig. 3 and 5) are
one config field, ``block``:

- ``adaln_zero`` (the paper's choice): adaptive layer norm whose shift ``beta`` and scale
  ``gamma`` are regressed from ``c = emb(t) + emb(y)``, plus a per-channel gate ``alpha`` applied
  just before each residual connection; the regressing MLP is zero-initialised, so every block
  starts as the identity.
- ``adaln``: the same shift and scale (no gate), regressed by a normally initialised layer.
- ``in_context``: ``emb(t)`` and ``emb(y)`` join the sequence as two extra tokens of plain ViT
  blocks, removed after the last block.
- ``cross_attention``: ``[emb(t), emb(y)]`` is a length-two sequence that a cross-attention
  layer after the self-attention of every block attends to.

With ``context_dim`` every block also cross-attends to text tokens ``cond.context`` after its
self-attention (as LDM's and PixArt-alpha's transformers do), for text-to-image. The file reads
top to bottom: config, layers, model, size presets (Table 1), registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from difflab.components import DataSpec, Family, image_shape, register_family
from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value
from difflab.networks.attention import Attention
from difflab.networks.layers import TimeEmbedding, check_context, check_labels, preset_config

__all__ = ["BLOCKS", "DiT", "DiTBlock", "DiTConfig", "sincos_2d", "unpatchify"]

BLOCKS = ("adaln_zero", "adaln", "in_context", "cross_attention")
ADAPTIVE = ("adaln_zero", "adaln")


@dataclass
class DiTConfig:
    """Hyper-parameters of :class:`DiT` (names follow the DiT code's ``DiT(...)`` arguments).

    Attributes:
        image_size: side of the (square) training images or latents; other sides divisible by
            ``patch_size`` are accepted (their positions are computed on the fly).
        patch_size: side ``p`` of the patches; ``(image_size / p) ** 2`` tokens (Sec. 3.2).
        in_channels: channels of ``x``.
        out_channels: channels predicted (doubled when ``learn_sigma``).
        hidden_size: token width ``d`` (Table 1).
        depth: number of DiT blocks ``N`` (Table 1).
        num_heads: attention heads (Table 1).
        mlp_ratio: width of the MLP over ``hidden_size`` (4 in every DiT).
        num_classes: class-conditional with this many classes (None: unconditional). The
            embedding has ``num_classes + 1`` rows; id ``num_classes`` is the null class of
            classifier-free guidance (the diffusion task drops labels to it).
        context_dim: width of ``cond.context`` text tokens, attended by a cross-attention layer
            in every block (None: no text).
        learn_sigma: also output iDDPM's variance interpolation ``v`` (eq. 15), as DiT trains.
        block: the block design of the ablation (Sec. 3.2): ``adaln_zero``, ``adaln``,
            ``in_context`` or ``cross_attention`` (see the module docstring).
        time_freq_dim: width of the sinusoidal time features fed to the time MLP (256).
        time_freq_shift: 0 as the DiT code (frequencies ``10000 ** (-i / half)``); 1 reproduces
            diffusers' ``DiTTransformer2DModel``, whose frequencies are ``10000 ** (-i / (half -
            1))`` (set when one is loaded).
        mlp_norm_eps: epsilon of the layer norm before the MLP: 1e-6 as the DiT code;
            diffusers' layout uses its ``norm_eps`` (1e-5) there.
        grad_checkpointing: recompute each block's activations in the backward pass (less
            memory, about a third more compute).
    """

    image_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int | None = None
    context_dim: int | None = None
    learn_sigma: bool = False
    block: Literal["adaln_zero", "adaln", "in_context", "cross_attention"] = "adaln_zero"
    time_freq_dim: int = 256
    time_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "in_channels", "out_channels", "hidden_size",
                     "depth", "num_heads", "time_freq_dim"):
            if getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "a positive int")
        if self.image_size % self.patch_size:
            raise bad_value("image_size", self.image_size,
                            f"a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise bad_value("num_heads", self.num_heads,
                            f"a divisor of hidden_size={self.hidden_size}")
        if self.hidden_size % 4:  # sin and cos of two axes: a quarter of the width each
            raise bad_value("hidden_size", self.hidden_size, "a multiple of 4 (the 2-D sin-cos "
                            "positions give each axis half the width, half sines, half cosines)")
        if self.mlp_ratio <= 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise bad_value("mlp_ratio", self.mlp_ratio, "a positive width multiplier")
        for name in ("num_classes", "context_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad_value(name, getattr(self, name), "None or an int >= 1")
        if self.block not in BLOCKS:
            raise bad_value("block", self.block, f"one of {', '.join(BLOCKS)}")
        if not 0 <= self.time_freq_shift < self.time_freq_dim // 2:
            raise bad_value("time_freq_shift", self.time_freq_shift, "0 (DiT) or 1 (diffusers)")
        if not self.mlp_norm_eps > 0:
            raise bad_value("mlp_norm_eps", self.mlp_norm_eps, "a positive float")

    @property
    def grid(self) -> int:  # patches per side at image_size
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DiTConfig:
        """A named size (``tiny``, ``S``, ``B``, ``L``, ``XL``; see ``PRESETS``) with overrides.

        Example: ``DiTConfig.preset("S", patch_size=4, image_size=28, in_channels=1)`` (S/4).
        """
        return preset_config(cls, PRESETS, name, overrides, scale_attention=False)


# ----- layers ------------------------------------------------------------------------------------
def sincos_2d(dim: int, h: int, w: int) -> Tensor:
    """The fixed 2-D sine-cosine positions of an ``h x w`` patch grid, ``(h * w, dim)`` float32.

    The frequency-based positions of ViT / MAE that DiT adds after patchify (Sec. 3.2). Token
    ``n = i w + j`` (row ``i``, column ``j``, the order of a flattened feature map) gets, with
    ``q = dim / 4`` and ``omega_k = 10000 ** (-k / q)`` for ``k = 0 .. q - 1``::

        [sin(j omega), cos(j omega), sin(i omega), cos(i omega)]

    (the column first, as the DiT code's ``meshgrid(grid_w, grid_h)``). Computed in float64.
    """
    q = dim // 4
    omega = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float64) / q)  # (q,)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                                torch.arange(w, dtype=torch.float64), indexing="ij")

    def axis(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega  # (h w, q)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (h w, dim / 2)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()  # (h w, dim)


def unpatchify(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """``(B, h w, p p C) -> (B, C, h p, w p)``: each token's ``(p, p, C)`` values (channels
    fastest) back to its patch (Sec. 3.2 "Transformer decoder")."""
    B, C = tokens.shape[0], tokens.shape[-1] // (p * p)
    x = tokens.reshape(B, h, w, p, p, C)  # (B, h, w, p, p, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, w * p)  # (B, C, H, W)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN (Sec. 3.2): ``x (1 + gamma) + beta`` with ``(B, 1, D)`` shift and scale."""
    return torch.addcmul(shift, x, 1.0 + scale)


class Mlp(nn.Module):
    """The transformer's point-wise MLP: ``fc2(GELU_tanh(fc1(x)))`` (ViT; DiT's tanh GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """One DiT block of the chosen design (Sec. 3.2, Fig. 3).

    adaLN-Zero: ``(beta1, gamma1, alpha1, beta2, gamma2, alpha2) = Linear(SiLU(c))`` and::

        x = x + alpha1 * Attn(LN(x) (1 + gamma1) + beta1)
        x = x + alpha2 * MLP(LN(x) (1 + gamma2) + beta2)

    adaLN drops the gates ``alpha`` (four outputs); in-context and cross-attention blocks are
    standard pre-norm ViT blocks (learned layer-norm affines), the latter with
    ``x = x + CrossAttn(LN(x), [emb(t), emb(y)])`` after the self-attention. With text, every
    design adds ``x = x + CrossAttn(LN(x), context)`` there too.

    Args:
        c: the model's config.
    """

    def __init__(self, c: DiTConfig) -> None:
        super().__init__()
        D, heads = c.hidden_size, c.num_heads
        adaptive = c.block in ADAPTIVE
        self.norm1 = nn.LayerNorm(D, eps=1e-6, elementwise_affine=not adaptive)
        self.attn = Attention(D, heads, D // heads, qkv_bias=True)
        self.cond_norm: nn.Module | None = None
        self.cond_attn: Attention | None = None
        if c.block == "cross_attention":
            self.cond_norm = nn.LayerNorm(D, eps=1e-6)
            self.cond_attn = Attention(D, heads, D // heads, context_dim=D, qkv_bias=True)
        self.text_norm: nn.Module | None = None
        self.text_attn: Attention | None = None
        if c.context_dim is not None:
            self.text_norm = nn.LayerNorm(D, eps=1e-6)
            self.text_attn = Attention(D, heads, D // heads, context_dim=c.context_dim,
                                       qkv_bias=True)
        self.norm2 = nn.LayerNorm(D, eps=c.mlp_norm_eps, elementwise_affine=not adaptive)
        self.mlp = Mlp(D, int(D * c.mlp_ratio))
        self.parts = {"adaln_zero": 6, "adaln": 4}.get(c.block, 0)
        self.modulation = nn.Linear(D, self.parts * D) if self.parts else None

    def forward(self, x: Tensor, c: Tensor | None, tokens: Tensor | None,
                context: Tensor | None, mask: Tensor | None) -> Tensor:
        """Apply the block.

        Args:
            x: tokens ``(B, N, D)``.
            c: ``SiLU(emb(t) + emb(y))`` ``(B, D)`` (adaLN designs; else None).
            tokens: the conditioning sequence ``(B, S, D)`` (cross-attention design; else None).
            context, mask: text tokens ``(B, L, context_dim)`` and their mask ``(B, L)``.

        Returns:
            ``(B, N, D)``.
        """
        if self.modulation is None:
            x = x + self.attn(self.norm1(x))  # (B, N, D)
            if self.cond_attn is not None:
                x = x + self.cond_attn(self.cond_norm(x), tokens)  # (B, N, D)
            x = self._text(x, context, mask)  # (B, N, D)
            return x + self.mlp(self.norm2(x))  # (B, N, D)
        mod = self.modulation(c).unsqueeze(1).chunk(self.parts, dim=-1)  # parts x (B, 1, D)
        if self.parts == 6:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod
        else:
            (shift1, scale1, shift2, scale2), gate1, gate2 = mod, None, None
        h = self.attn(modulate(self.norm1(x), shift1, scale1))  # (B, N, D)
        x = x + (h if gate1 is None else gate1 * h)  # (B, N, D)
        x = self._text(x, context, mask)  # (B, N, D)
        h = self.mlp(modulate(self.norm2(x), shift2, scale2))  # (B, N, D)
        return x + (h if gate2 is None else gate2 * h)  # (B, N, D)

    def _text(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        return x if self.text_attn is None else x + self.text_attn(self.text_norm(x), context, mask)


class FinalLayer(nn.Module):
    """The decoder (Sec. 3.2): layer norm (adaptive for the adaLN designs: shift and scale from
    ``Linear(SiLU(c))``), then a linear map of each token to ``p * p * C_out`` values."""

    def __init__(self, c: DiTConfig) -> None:
        super().__init__()
        D, adaptive = c.hidden_size, c.block in ADAPTIVE
        self.norm = nn.LayerNorm(D, eps=1e-6, elementwise_affine=not adaptive)
        self.modulation = nn.Linear(D, 2 * D) if adaptive else None
        out = c.out_channels * (2 if c.learn_sigma else 1)
        self.linear = nn.Linear(D, c.patch_size * c.patch_size * out)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        """``(B, N, D) -> (B, N, p p C_out)``."""
        h = self.norm(x)
        if self.modulation is not None:
            h = modulate(h, *self.modulation(c).unsqueeze(1).chunk(2, dim=-1))  # shift, scale
        return self.linear(h)


# ----- the model ---------------------------------------------------------------------------------
class DiT(nn.Module):
    """The Diffusion Transformer (see the module docstring), built from its ``config``."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = c = config
        D = c.hidden_size
        self.adaptive = c.block in ADAPTIVE
        self.in_context = c.block == "in_context"
        self.patch_embed = nn.Conv2d(c.in_channels, D, c.patch_size, stride=c.patch_size)
        self.register_buffer("pos_embed", sincos_2d(D, c.grid, c.grid), persistent=False)
        self.time_embed = TimeEmbedding(c.time_freq_dim, D, freq_shift=c.time_freq_shift)
        self.label_emb = None if c.num_classes is None else nn.Embedding(c.num_classes + 1, D)
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.depth))
        self.final = FinalLayer(c)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """All special initialisation, in one place (Sec. 3.2 and the DiT code's
        ``initialize_weights``).

        Every linear layer Xavier-uniform with zero bias; the patch embedding initialised like
        the linear map it is over ``p * p * C`` inputs (its bias keeps the convolution's
        default); class-embedding rows and both time-MLP weights normal with std 0.02; the
        output linear layer zero, so the initial output is exactly zero. adaLN-Zero also zeroes
        every modulation layer, whole (the gates ``alpha`` and the shifts and scales), and the
        final layer's: each block starts as the identity. difflab adds: in adaLN-Zero the text
        cross-attention's output projection is zero too, so the identity start holds with text.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.label_emb is not None:
            nn.init.normal_(self.label_emb.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embed.linear_2.weight, std=0.02)
        zero: list[nn.Module] = [self.final.linear]
        if self.config.block == "adaln_zero":
            zero += [self.final.modulation, *(b.modulation for b in self.blocks)]
            zero += [b.text_attn.to_out for b in self.blocks if b.text_attn is not None]
        for m in zero:
            for p in m.parameters():
                nn.init.zeros_(p)

    def forward(self, x: Tensor, t: Tensor, cond: Cond | None = None) -> Tensor:
        """Predict from a noisy input.

        Args:
            x: noisy input ``(B, in_channels, H, W)``; H, W multiples of ``patch_size``.
            t: time signal ``(B,)`` or a scalar, already mapped (the step index ``0 .. N - 1``
                for DiT's discrete path); may be fractional.
            cond: optional ``labels (B,)`` int64 in ``[0, num_classes]`` (absent = the null
                class), ``context (B, L, context_dim)`` and ``context_mask (B, L)``.

        Returns:
            ``(B, out_channels, H, W)``, or ``(B, 2 * out_channels, H, W)`` with
            ``learn_sigma``: the mean parameterization, then iDDPM's ``v`` (eq. 15).
        """
        t, labels, context, mask = self._check_inputs(x, t, cond)
        p = self.config.patch_size
        h, w = x.shape[2] // p, x.shape[3] // p
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, T, D), T = h w
        tokens = tokens + self._positions(h, w).to(tokens.dtype)  # (B, T, D)
        emb = self.time_embed(t)  # (B, D)
        y = None if self.label_emb is None else self.label_emb(labels)  # (B, D)
        c = seq = None
        if self.adaptive:
            c = F.silu(emb if y is None else emb + y)  # (B, D), the SiLU opening every adaLN MLP
        else:
            seq = torch.stack([emb] if y is None else [emb, y], dim=1)  # (B, S, D), S = 1 or 2
        if self.in_context:
            tokens, seq = torch.cat([seq, tokens], dim=1), None  # (B, S + T, D)
        for block in self.blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, seq, context, mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, seq, context, mask)  # (B, T', D)
        tokens = tokens[:, tokens.shape[1] - h * w:]  # (B, T, D): in-context tokens dropped
        out = self.final(tokens, c)  # (B, T, p p C_out)
        return unpatchify(out, h, w, p)  # (B, C_out, H, W)

    def _positions(self, h: int, w: int) -> Tensor:
        n = self.config.grid
        return self.pos_embed if (h, w) == (n, n) else sincos_2d(
            self.config.hidden_size, h, w).to(self.pos_embed.device)

    def _check_inputs(self, x: Tensor, t: Tensor, cond: Cond | None) -> tuple[Any, ...]:
        """Validate; returns ``(t, labels, context, context_mask)``."""
        c, cond = self.config, cond if cond is not None else Cond()
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != c.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DifflabError(f"DiT: expected x of shape (B, {c.in_channels}, H, W) "
                               f"(in_channels={c.in_channels}), got {got}")
        B, (H, W), p = x.shape[0], x.shape[2:], c.patch_size
        if H % p or W % p:
            raise DifflabError(f"DiT: image size {H}x{W} is not divisible by the patch size {p} "
                               f"(patch_size={p}): resize or pad to a multiple of {p}, or use a "
                               "patch size that divides it")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(B) if t.ndim == 0 else t
        if t.shape != (B,):
            raise DifflabError(f"DiT: expected t of shape ({B},) or a scalar, got "
                               f"{tuple(t.shape)}")
        for name in ("concat", "control"):
            if getattr(cond, name) is not None:
                raise DifflabError(f"DiT: cond.{name} given, but a DiT reads only cond.labels "
                                   "and cond.context / context_mask: use arch='unet' for "
                                   f"{name} inputs")
        return (t, check_labels("DiT", cond.labels, c.num_classes, B, x.device),
                *check_context("DiT", cond.context, cond.context_mask, c.context_dim, B,
                               self.patch_embed.weight.dtype))


# Size presets: Table 1 of the paper (S, B, L, XL; the patch size is its own field, 2, 4 or 8,
# as DiT-S/2 ... DiT-XL/8), at the paper's 32x32x4 latents of 256 px ImageNet; ``tiny`` is for
# tests. Training fills image_size, channels and classes in from the data.
PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(image_size=8, in_channels=1, out_channels=1, hidden_size=32, depth=2,
                      num_heads=2),
    "S": DiTConfig(hidden_size=384, depth=12, num_heads=6),
    "B": DiTConfig(hidden_size=768, depth=12, num_heads=12),
    "L": DiTConfig(hidden_size=1024, depth=24, num_heads=16),
    "XL": DiTConfig(hidden_size=1152, depth=28, num_heads=16),
}


# ----- the registry entry ------------------------------------------------------------------------
def _reads(c: DiTConfig) -> frozenset[str]:
    fields = {"labels"} if c.num_classes is not None else set()
    fields |= {"context", "context_mask"} if c.context_dim is not None else set()
    return frozenset(fields)


def _from_data(d: DataSpec) -> dict[str, Any]:
    """Image size and channels from the data (output channels = input channels), classes and
    context width from the task (None when it does not condition on them)."""
    if d.concat_channels is not None:
        raise DifflabError("model.arch='dit' takes no channels joined to its input "
                           "(task.concat): use arch='unet' for depth-conditioned models")
    out: dict[str, Any] = {"num_classes": d.num_classes, "context_dim": d.context_dim}
    if d.image_size is not None:
        out["image_size"] = d.image_size
    if d.channels is not None:
        out["in_channels"] = out["out_channels"] = d.channels
    return out


FAMILY = register_family(Family(
    name="dit", config=DiTConfig, build=DiT, kind="denoiser", presets=PRESETS,
    default_preset="S", conditioning=_reads, resolve=_from_data, input_shape=image_shape,
    learned_variance=lambda c: c.learn_sigma, scale_attention=False,
    doc="DiT, the Diffusion Transformer (Peebles & Xie 2023): adaLN-Zero and the ablation's "
        "other blocks, class and text inputs"))
